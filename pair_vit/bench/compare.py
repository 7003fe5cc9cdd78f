"""Every matcher on one benchmark, in one process: the table behind docs/results.md.

Rows: the peers (PDQ, pHash, SIFT + RANSAC), the descriptor shortlist (per query-view setting, with and
without background score normalisation) and the pair-ViT reranking (per set of query views, from one run
that scores every view; "+fused" rows use the calibration stored with the weights, "+fused (cross-fit)" one
fitted on the other half of the queries), each with uAP, recall@P90, recall@1, recall@k of the top-k list
and wall time. Machine-dependent timings are also given as a ratio to PDQ run in the same process.
A second table measures how faiss search time grows with the reference-set size (Flat vs IVF-PQ).

    python scripts/benchmark.py --benchmark benchmarks/dev --background ../shared/data/train
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pair_vit import baselines, data
from pair_vit import metrics as evaluation
from pair_vit.match.calibration import similarity_margin
from pair_vit.config import opt, option_like, save_config
from pair_vit.match.config import RerankConfig
from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.descriptor.views import REFERENCE_VIEWS, VIEWS

RECALL_KS = (1, 5, 10, 20, 50)


@dataclass
class CompareConfig:
    """Run every matcher on a benchmark and write results.csv / results.md (+ search-scaling table)."""

    benchmark: str = opt("", "benchmark folder written by scripts/make_benchmark.py")
    out: str = opt("", "folder for the tables (default: BENCHMARK/results)")
    methods: list = opt(["pdq", "phash", "sift", "descriptor", "rerank"], "matchers to run")
    k: int = opt(50, "predictions per query (recall@k is reported up to this k)")
    descriptor_checkpoint: str = opt("", "descriptor weights (default: the ones shipped in the package)")
    views: list = opt(["full", "halves", "regions"], "descriptor query-view settings to compare (full, halves, "
                                                      "grid, regions)")
    background: str = opt("", "folder of photos for score normalisation (its train split is used; must not "
                              "overlap the benchmark); empty: no normalised rows")
    background_split: str = opt("train", "which side of the fixed split of --background to use",
                                choices=("train", "all"))
    background_max: int = opt(2000, "at most this many background photos")
    pair_checkpoint: str = opt("", "pair-ViT weights (default: the ones shipped in the package)")
    pair_views: list = opt(["full", "center", "halves", "rotations", "hflip"],
                           "pair-ViT query views scored once; rows for full alone, full + each other view or "
                           "group, and all of them")
    shortlist_views: str = opt("regions", "descriptor query views for the reranker's shortlist (as rerank.py --views)",
                               choices=VIEWS)
    reference_views: str = opt("halves", "views each reference is indexed as (as rerank.py --reference-views); "
                                         "descriptor rows with full references are added for comparison",
                               choices=REFERENCE_VIEWS)
    rerank_k: int = opt(20, "shortlist size the pair ViT rescores")
    rerank_work: str = opt("", "work folder of the reranker (default OUT/rerank.work); runs on one benchmark that "
                               "share it score each pair once, whatever their shortlists")
    token_recall: int = option_like(RerankConfig, "token_recall")
    token_factory: str = option_like(RerankConfig, "token_factory")
    token_nprobe: int = option_like(RerankConfig, "token_nprobe")
    token_geometry: bool = option_like(RerankConfig, "token_geometry")
    token_views: int = option_like(RerankConfig, "token_views")
    verify: str = opt("sift", "local verification of the reranker's pairs (rows with and without it): sift or "
                              "none", choices=("sift", "none"))
    smoke: str = opt("", "folder of real copy pairs (e.g. ../shared/data/smoke), one sub-folder each: a "
                         "ground_truth.csv naming query and reference, or *_original.* + one other image; "
                         "reports where the true reference ranks among distractors")
    smoke_distractors: str = opt("", "photos used as distractor references for --smoke (their dev split)")
    smoke_max: int = opt(1000, "at most this many distractors")
    batch_size: int = opt(64, "descriptor batch size")
    amp: bool = opt(True, "bf16 autocast for the descriptor where the CPU has native bf16 (--no-amp: float32)")
    scaling_sizes: list = opt([1000, 10000, 100000, 1000000], "reference-set sizes for the faiss search-time "
                                                                 "table (0 to skip)")
    scaling_queries: int = opt(1000, "queries searched per size in the scaling table")
    pr_curves: bool = opt(True, "write a precision-recall curve PNG per matcher")
    save_submissions: bool = opt(True, "write each matcher's submission CSV next to the tables")


def _save_artefacts(label: str, submission: pd.DataFrame, gt: pd.DataFrame, cfg: CompareConfig, out: Path) -> None:
    if cfg.save_submissions:
        with atomic_path(out / f"{label}.csv") as tmp:
            submission.to_csv(tmp, index=False)
    if cfg.pr_curves:
        precision, recall, _ = evaluation.precision_recall_curve(
            submission.score.to_numpy(), evaluation.label_predictions(submission, gt), len(gt))
        evaluation.write_pr_curve(out / f"pr_{label}.png", precision, recall, title=label)


def artefact_name(method: str, variant: str) -> str:
    """A file-name-safe label: rerank + "full+center +fused" -> rerank_full+center_fused."""
    label = f"{method}_{variant}" if variant else method
    safe = "".join(c if c.isalnum() or c in "+-." else "_" for c in label.replace(" +", "_"))
    return "_".join(part for part in safe.split("_") if part)


def _metrics_row(name: str, variant: str, submission: pd.DataFrame, gt: pd.DataFrame, seconds: float,
                 n_images: int, n_queries: int) -> dict:
    m = evaluation.evaluate(submission, gt)

    recalls = evaluation.recall_at_k(submission, gt, RECALL_KS)
    return {"method": name, "variant": variant, "uAP": m.uap, "recall@P90": m.recall_at_p90,
            "threshold@P90": m.threshold_at_p90, "recall@1": m.recall_at_1,
            **{f"R@{k}": v for k, v in recalls.items()},
            "seconds": seconds, "images/s": n_images / seconds if seconds > 0 else float("nan"),
            "s/query": seconds / max(1, n_queries)}


def _timed(fn: Callable[[], pd.DataFrame]) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


Result = tuple[str, str, pd.DataFrame, float]  # (method, variant, submission, wall seconds)


def peer_results(method: str, layout: data.DiscLayout, cfg: CompareConfig) -> list[Result]:
    q, r = layout.query_images(), layout.reference_images()
    if method == "sift":
        sub, sec = _timed(lambda: baselines.sift_submission(q, r, k=min(cfg.k, 20), candidates=20))
    elif method in baselines.HASH_METHODS:
        sub, sec = _timed(lambda: baselines.hash_submission(q, r, method, k=cfg.k))
    else:
        raise ValueError(f"unknown matcher {method!r}; available: {list(baselines.METHODS) + ['descriptor', 'rerank']}")
    return [(method, "", sub, sec)]


def _background(cfg: CompareConfig) -> dict[str, Path] | None:
    if not cfg.background:
        return None
    images = data.split_images(data.list_images(cfg.background), cfg.background_split)
    ids = sorted(images)[: cfg.background_max]
    return {i: images[i] for i in ids}


def descriptor_results(layout: data.DiscLayout, cfg: CompareConfig) -> list[Result]:
    """Descriptor shortlist for each view setting: plain, with the shortlist margin, (with --background)
    score-normalised, and for multi-view settings merged by the plain max (no sub-view penalty)."""
    from pair_vit.match import index as ix
    from pair_vit.descriptor.model import load_descriptor
    from pair_vit.match.rerank import DEFAULT_CHECKPOINT

    model, _ = load_descriptor(cfg.descriptor_checkpoint or DEFAULT_CHECKPOINT)
    q, r = layout.query_images(), layout.reference_images()
    embed = dict(batch_size=cfg.batch_size, amp=cfg.amp)
    index, ref_sec = _timed(lambda: ix.update_reference_index(model, r, None, views=cfg.reference_views, **embed))
    full_refs = None
    if cfg.reference_views != "full":  # embedded again, not sliced from `index`: its row reports its own time
        full_refs, full_sec = _timed(lambda: ix.update_reference_index(model, r, None, **embed))
    bg_images = _background(cfg)
    bg = ix.build_background(model, bg_images, **embed) if bg_images else None
    rows = []
    for views in cfg.views:
        (q_ids, q_vec, owner), q_sec = _timed(lambda: ix.embed_folder(model, q, views=views, **embed))
        for name, background in [("", None)] + ([("+norm", bg)] if bg is not None else []):
            sub, s_sec = _timed(lambda: ix.search_views(index, q_ids, q_vec, owner, cfg.k, background))
            rows.append(("descriptor", views + name, sub, ref_sec + q_sec + s_sec))
            if not name:  # the shortlist margin (`rerank.py --descriptor-only --margin`): free, no background
                margin = sub.score + similarity_margin(sub.query_id.to_numpy(), sub.score.to_numpy())
                rows.append(("descriptor", views + "+margin", sub.assign(score=margin), ref_sec + q_sec + s_sec))
        if views != "full":
            sub, s_sec = _timed(lambda: ix.search_views(index, q_ids, q_vec, owner, cfg.k, subview_penalty=0.0,
                                                        reference_penalty=0.0))
            rows.append(("descriptor", views + " plain max", sub, ref_sec + q_sec + s_sec))
        if full_refs is not None:
            sub, s_sec = _timed(lambda: ix.search_views(full_refs, q_ids, q_vec, owner, cfg.k))
            rows.append(("descriptor", views + " full refs", sub, full_sec + q_sec + s_sec))
    return rows


def view_sets(views: list[str]) -> list[tuple[str, list[str]]]:
    """The pair-view settings compared, named: full alone, full + each other view or group, all of them."""
    from pair_vit.pair.scoring import expand_views

    sets = [("full", ["full"])]
    for name in views:
        if name != "full":
            sets.append((f"full+{name}", expand_views(["full", name])))
    everything = expand_views(["full", *views])
    return sets + ([("all views", everything)] if everything not in [v for _, v in sets] else [])


def rerank_results(layout: data.DiscLayout, gt: pd.DataFrame, cfg: CompareConfig, out: Path) -> list[Result]:
    """Descriptor shortlist rescored by the pair ViT (and SIFT verification): one run scoring every view, then
    rows per view set: the plain sigmoid, the stored calibration, cross-fitted fusions with and without the
    verification, and the descriptor + verification without the pair ViT (what the pair ViT adds)."""
    from pair_vit.match import rerank
    from pair_vit.match.calibration import Calibration

    work = cfg.rerank_work or str(out / "rerank.work")
    rcfg = rerank.RerankConfig(queries=str(layout.queries), references=str(layout.references),
                               output=str(out / "rerank.csv"), work_dir=work, k=cfg.rerank_k,
                               checkpoint=cfg.pair_checkpoint, descriptor_checkpoint=cfg.descriptor_checkpoint,
                               pair_views=list(cfg.pair_views), views=cfg.shortlist_views, amp=cfg.amp,
                               reference_views=cfg.reference_views, token_recall=cfg.token_recall,
                               token_factory=cfg.token_factory, token_nprobe=cfg.token_nprobe,
                               token_geometry=cfg.token_geometry, token_views=cfg.token_views, verify=cfg.verify,
                               calibration="none", progress=False)
    found, seconds = _timed(lambda: rerank.match(rcfg))
    stored = found.stored_calibration
    rows, scored, stats = [], found.rows, found.stats
    shortlist_sec = seconds - stats.get("pair_seconds", 0.0) - stats.get("verify_seconds", 0.0)
    verify_sec = stats.get("verify_seconds", 0.0)
    inliers = scored.inliers.to_numpy() if "inliers" in scored else None
    votes = scored.votes.to_numpy() if "votes" in scored else None
    labels = evaluation.label_predictions(scored, gt)
    n_views = len([c for c in scored.columns if c.startswith("logit_")])
    local = ["logit_local"] if "logit_local" in scored else []  # a localizing model: every view set reads it too
    for name, views in view_sets(list(cfg.pair_views)):
        logit = scored[[f"logit_{v}" for v in views] + local].max(axis=1).to_numpy()
        sec = shortlist_sec + stats.get("pair_seconds", 0.0) * len(views) / max(n_views, 1)
        sub = scored[["query_id", "reference_id"]].assign(score=Calibration().apply(logit, scored.score))
        rows.append(("rerank", name, sub, sec))
        if stored.fuses and (inliers is not None or not stored.needs_inliers) and (
                votes is not None or not stored.needs_votes):
            fused = stored.apply(logit, scored.score, scored.query_id.to_numpy(), inliers, votes)
            sec_fused = sec + (verify_sec if stored.needs_inliers else 0.0)
            rows.append(("rerank", name + " +fused", sub.assign(score=fused), sec_fused))
        if labels.any() and not labels.all():
            rows += _cross_fitted(name, sub, logit, scored, labels, inliers, votes, (shortlist_sec, sec, verify_sec))
    _signal_table(cfg, scored, gt, rows, out)
    return rows


def _signal_table(cfg: CompareConfig, scored: pd.DataFrame, gt: pd.DataFrame, rows: list[Result], out: Path) -> None:
    """Each signal's rank-1 rate per edit family (pair_vit.bench.signals), next to the fused default's."""
    from pair_vit.bench.signals import edits_of, signal_ranks

    edits = edits_of(cfg.benchmark)
    fused = {variant: sub.score.to_numpy() for _, variant, sub, _ in rows
             if variant in ("full +fused (cross-fit)", "full +fused +verified (cross-fit)",
                            "full +fused +verified +votes (cross-fit)")}
    if edits is not None and len(gt):
        table = signal_ranks(scored, gt, edits, {k.replace("full +", ""): v for k, v in fused.items()})
        _write(table, out, "signal_rank1", f"Rank-1 among shortlisted true copies, per signal and edit family "
                                           f"({cfg.benchmark})", "python " + " ".join(sys.argv))


def _cross_fitted(name: str, sub: pd.DataFrame, logit: np.ndarray, scored: pd.DataFrame, labels: np.ndarray,
                  inliers: np.ndarray | None, votes: np.ndarray | None,
                  seconds: tuple[float, float, float]) -> list[Result]:
    """Honest (2-fold cross-fitted) fused rows: pair logit + descriptor (+ SIFT inliers; and without the logit;
    + token-recall votes). `seconds`: (shortlist, shortlist + pair scoring, verification) wall time."""
    from pair_vit.match.calibration import cross_fit

    shortlist_sec, sec, verify_sec = seconds
    q, sim = scored.query_id.to_numpy(), scored.score.to_numpy()
    rows = [("rerank", name + " +fused (cross-fit)", sub.assign(score=cross_fit(q, logit, sim, labels)), sec)]
    if inliers is not None:
        both = cross_fit(q, logit, sim, labels, inliers=inliers)
        rows.append(("rerank", name + " +fused +verified (cross-fit)", sub.assign(score=both), sec + verify_sec))
        if name == "full":  # the pair ViT's contribution: the same fit with a constant logit
            alone = cross_fit(q, np.zeros(len(q)), sim, labels, inliers=inliers)
            rows.append(("rerank", "no pair ViT: descriptor +verified (cross-fit)",
                         sub.assign(score=alone), shortlist_sec + verify_sec))
        if votes is not None:  # the default calibration's features when token recall is on
            voted = cross_fit(q, logit, sim, labels, inliers=inliers, votes=votes)
            rows.append(("rerank", name + " +fused +verified +votes (cross-fit)", sub.assign(score=voted),
                         sec + verify_sec))
    return rows


def smoke_pair(folder: Path) -> tuple[Path, Path]:
    """(query, reference) images of a smoke-pair folder (see CompareConfig.smoke)."""
    images = data.list_images(folder)
    if (folder / "ground_truth.csv").is_file():
        gt = data.read_ground_truth(folder / "ground_truth.csv")
        return images[gt.query_id.iloc[0]], images[gt.reference_id.iloc[0]]
    originals = [i for i in images if i.endswith("_original")]
    if len(images) != 2 or len(originals) != 1:
        raise ValueError(f"{folder}: expected ground_truth.csv, or two images one of which is *_original")
    query = next(i for i in images if i not in originals)
    return images[query], images[originals[0]]


def _rank(rows: pd.DataFrame, reference: str) -> float:
    ranked = list(rows.sort_values("score", ascending=False, kind="stable").reference_id)
    return float(ranked.index(reference) + 1) if reference in ranked else float("nan")


def smoke_ranks(cfg: CompareConfig) -> pd.DataFrame:
    """Rank of each real copy's true reference among `smoke_max` distractors (and the other pairs'
    references): descriptor and reranked. One rerank run for all pairs, so distractors are embedded once."""
    import tempfile

    from pair_vit.match import rerank

    distractors = data.split_images(data.list_images(cfg.smoke_distractors), "dev") if cfg.smoke_distractors else {}
    distractors = {i: distractors[i] for i in sorted(distractors)[: cfg.smoke_max]}
    pairs = {folder.name: smoke_pair(folder) for folder in sorted(p for p in Path(cfg.smoke).iterdir() if p.is_dir())}
    references = [*(r for _, r in pairs.values()), *distractors.values()]
    with tempfile.TemporaryDirectory() as tmp:
        qdir, rdir = _link_folder(Path(tmp, "queries"), [q for q, _ in pairs.values()]), _link_folder(
            Path(tmp, "references"), references)
        found = rerank.match(rerank.RerankConfig(
            queries=str(qdir), references=str(rdir), output=str(Path(tmp, "s.csv")), k=cfg.rerank_k,
            checkpoint=cfg.pair_checkpoint, descriptor_checkpoint=cfg.descriptor_checkpoint,
            pair_views=list(cfg.pair_views), views=cfg.shortlist_views, reference_views=cfg.reference_views,
            progress=False))
    sub, rows = found.submission(), []
    for name, (query, reference) in pairs.items():
        mine, shortlisted = sub[sub.query_id == query.stem], found.rows[found.rows.query_id == query.stem]
        rows.append({"pair": name, "references": len(references),
                     "descriptor rank": _rank(shortlisted, reference.stem), "reranked rank": _rank(mine, reference.stem),
                     "reranked score": float(mine.set_index("reference_id").score.get(reference.stem, float("nan")))})
    return pd.DataFrame(rows)


def _link_folder(folder: Path, paths: list[Path]) -> Path:
    """`folder` of symlinks to `paths`; two files with one image id are refused (ids come from file stems)."""
    folder.mkdir()
    for p in paths:
        link = folder / Path(p).name
        if any(other.stem == link.stem for other in folder.iterdir()):
            raise ValueError(f"smoke benchmark: two images share the id {link.stem!r} ({p})")
        link.symlink_to(Path(p).resolve())
    return folder


def model_throughput(cfg: CompareConfig, n: int = 512) -> dict:
    """Descriptor forward passes per second on preprocessed tensors (no decoding): {"bf16" (where native), "fp32"}."""
    import torch

    from pair_vit.descriptor.model import embed, load_descriptor
    from pair_vit.match.rerank import DEFAULT_CHECKPOINT

    model, _ = load_descriptor(cfg.descriptor_checkpoint or DEFAULT_CHECKPOINT)
    x = torch.randn(n, 3, model.image_size, model.image_size)
    embed(model, x[:64], cfg.batch_size)  # warm-up
    out = {}
    for name, amp in _precisions().items():
        _, sec = _timed(lambda: embed(model, x, cfg.batch_size, amp=amp))
        out[name] = n / sec
    return out


def pair_throughput(cfg: CompareConfig, n: int = 512) -> dict:
    """Pair-ViT forward passes per second on uint8 tensors (no decoding): {"bf16" (where native), "fp32"}."""
    from pair_vit.pair.model import SHIPPED_WEIGHTS, load_pair_model
    from pair_vit.pair.scoring import timed_pairs_per_second

    model, _ = load_pair_model(cfg.pair_checkpoint or SHIPPED_WEIGHTS)
    return {name: timed_pairs_per_second(model, n, amp=amp) for name, amp in _precisions().items()}


def _precisions() -> dict[str, bool]:
    """The precisions this CPU runs, named, with the `amp` setting that gives each (`pair_vit.precision`):
    bf16 and fp32 where bf16 is native, fp32 alone elsewhere (timing `amp=True` there would time fp32 twice)."""
    from pair_vit import precision

    return {"bf16": True, "fp32": False} if precision.use_bf16("cpu", True) else {"fp32": False}


def _speeds(speed: dict, unit: str) -> str:
    return ", ".join(f"{value:.0f} {unit} {name}" for name, value in speed.items())


def search_scaling(sizes: list[int], n_queries: int, dim: int = 256, seed: int = 0) -> pd.DataFrame:
    """Search time of n_queries random unit vectors against N random references, Flat vs IVF-PQ."""
    from pair_vit.match.index import ReferenceIndex

    rng = np.random.default_rng(seed)
    queries = _unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    rows = []
    for n in (s for s in sizes if s > 0):
        refs = _unit(rng.standard_normal((n, dim), dtype=np.float32))
        ids = [str(i) for i in range(n)]
        factories = ["Flat"] + ([f"IVF{_nlist(n)},PQ32"] if n >= 10000 else [])
        for factory in factories:
            index, build_sec = _timed(lambda: ReferenceIndex.build(ids, refs, factory=factory))
            _, search_sec = _timed(lambda: index.search(queries, 10))
            rows.append({"references": n, "index": factory, "build s": build_sec,
                         "search s": search_sec, "ms/query": 1000 * search_sec / n_queries})
    return pd.DataFrame(rows)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nlist(n: int) -> int:
    # ~4 sqrt(N) lists, capped: k-means over more lists costs minutes on 2 cores for little search gain here.
    return int(min(1024, max(64, 4 * np.sqrt(n))))


def _write(table: pd.DataFrame, out: Path, name: str, title: str, command: str) -> None:
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    md = f"### {title}\n\n`{command}`\n\n{table.to_markdown(index=False, floatfmt='.3f')}\n"
    write_text_atomic(out / f"{name}.md", md)
    print(md)


def run(cfg: CompareConfig, command: str | None = None) -> pd.DataFrame:
    """Write results.{csv,md} (and search_scaling.{csv,md}) under cfg.out; return the matcher table."""
    command = command or "python " + " ".join(sys.argv)
    if not cfg.benchmark:
        raise ValueError("--benchmark is required (a folder written by scripts/make_benchmark.py)")
    layout = data.DiscLayout.from_root(cfg.benchmark)
    gt = layout.load_ground_truth()
    out = Path(cfg.out) if cfg.out else Path(cfg.benchmark) / "results"
    save_config(cfg, out / "config.yaml")
    n_queries = len(layout.query_images())
    n_images = n_queries + len(layout.reference_images())
    rows = []
    for method in cfg.methods:
        results = (descriptor_results(layout, cfg) if method == "descriptor" else
                   rerank_results(layout, gt, cfg, out) if method == "rerank" else peer_results(method, layout, cfg))
        for name, variant, sub, seconds in results:
            rows.append(_metrics_row(name, variant, sub, gt, seconds, n_images, n_queries))
            _save_artefacts(artefact_name(name, variant), sub, gt, cfg, out)
            print(f"{name} {variant}: uAP {rows[-1]['uAP']:.4f}  ({seconds:.1f} s)")
    table = pd.DataFrame(rows)
    if "pdq" in set(table.method):
        table["time vs pdq"] = table.seconds / float(table.loc[table.method == "pdq", "seconds"].iloc[0])
    _write(table, out, "results", f"Matchers on {cfg.benchmark}", command)
    if "descriptor" in cfg.methods:
        speed = model_throughput(cfg)
        print(f"descriptor forward passes: {_speeds(speed, 'img/s')}")
    if "rerank" in cfg.methods:
        speed = pair_throughput(cfg)
        print(f"pair-ViT forward passes: {_speeds(speed, 'pairs/s')}")
    if any(s > 0 for s in cfg.scaling_sizes):
        _write(search_scaling(cfg.scaling_sizes, cfg.scaling_queries), out, "search_scaling",
               "faiss search time vs reference-set size (random 256-d vectors, top-10)", command)
    if cfg.smoke:
        _write(smoke_ranks(cfg), out, "smoke", f"Real copies from {cfg.smoke} among distractor references", command)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory {peak:.0f} MB")
    return table
