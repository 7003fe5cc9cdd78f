"""Matching: shortlist candidate references for every query with the descriptor, rescore every candidate pair
with the pair ViT, and write a matching-track submission `query_id,reference_id,score` (higher = more
likely a copy).

    python scripts/rerank.py --queries Q/ --references R/ --output sub.csv [--k 20] [--pair-views full center]
    python scripts/rerank.py ... --descriptor-only            # stage 1 alone: score = descriptor similarity
    python scripts/rerank.py ... --descriptor-only --margin   # + its margin over the query's other candidates

Reranked scores are calibrated probabilities, comparable across queries (`pair_vit.match.calibration`): with the
shipped weights, the fit stored in the pair-ViT checkpoint (it fuses the pair logit with the descriptor
similarity, the SIFT RANSAC inliers of the pair (`pair_vit.match.verify`, `--verify sift`) and the margins of
both); the model card gives the score threshold with precision 90 on the dev benchmark.

Resuming: intermediate results live in a work folder (default OUTPUT.work/): the reference index (unless
`--index DIR` names a shared one; an index built with another descriptor is refused), the shortlist, and
the pair scores and the verification inliers in chunks of `--chunk-queries` queries (`pair_vit.cache`). A
killed run restarted with the same arguments reuses them; each stage's cache is dropped when its inputs
(images, weights, settings) change. The pair and verify stages also reuse every pair they scored before, so a
run with another shortlist (descriptor, `--k`, token recall) scores only its new pairs.

Under `accelerate launch` (any number of processes, CPU or GPU) references, background photos and queries
are split between the processes for embedding, the pair-scoring chunks are dealt out round-robin, and the
main process writes one submission, identical to a single-process run.
"""
from __future__ import annotations

import io
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pair_vit import cache, data
from pair_vit import metrics as evaluation
from pair_vit.match import index as ix
from pair_vit.match.calibration import Calibration, similarity_margin
from pair_vit.match.config import CALIBRATIONS, RerankConfig  # noqa: F401  (RerankConfig: part of this stage's API)
from pair_vit.config import save_config
from pair_vit.descriptor.model import SHIPPED_WEIGHTS as DESCRIPTOR_WEIGHTS
from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.pair.model import SHIPPED_WEIGHTS
from pair_vit.pair.scoring import expand_views, score_shortlist
from pair_vit.processes import Processes
from pair_vit.match.verify import METHOD as VERIFY_METHOD
from pair_vit.match.verify import verify_shortlist

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = DESCRIPTOR_WEIGHTS
TOKEN_DEPTH = 4  # with token recall, the descriptor lists 4k references: the similarities voted ones keep
PAIR_COLUMNS = ("query_id", "reference_id", "score")  # the shortlist columns the pair and verify stages read


@dataclass
class Matches:
    """What `match` found: `rows` holds query_id, reference_id, score (descriptor similarity), with token recall
    votes and, when reranked, logit_<view> per pair view, logit (their max) and, when verified, inliers;
    `calibration` turns them into the submission score."""

    rows: pd.DataFrame
    report: data.SkipReport
    calibration: Calibration | None = None
    stats: dict[str, float] = field(default_factory=dict)
    margin: bool = False  # descriptor-only: add `similarity_margin` to the similarity
    stored_calibration: Calibration | None = None  # the pair checkpoint's own (whatever `calibration` is used)

    def submission(self) -> pd.DataFrame:
        """query_id, reference_id, score: calibrated pair score, or the similarity for a shortlist."""
        sub = self.rows[["query_id", "reference_id", "score"]].copy()
        if self.calibration is not None and "logit" in self.rows:
            column = lambda name: self.rows[name].to_numpy() if name in self.rows else None  # noqa: E731
            sub["score"] = self.calibration.apply(self.rows.logit.to_numpy(), self.rows.score.to_numpy(),
                                                  self.rows.query_id.to_numpy(), column("inliers"), column("votes"))
        elif self.margin:
            sub["score"] = sub.score + similarity_margin(sub.query_id.to_numpy(), sub.score.to_numpy())
        return sub


# ----------------------------------------------------------------------------- steps


def embed_split(procs: Processes, model, images: dict[str, Path], report: data.SkipReport, views: str,
                cfg: RerankConfig, desc: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """embed_folder over all processes: each embeds its share; everyone gets the concatenated result."""
    ids, vectors, owner = ix.embed_folder(model, procs.share(images), cfg.batch_size, cfg.amp, views, report,
                                          cfg.num_workers, progress=cfg.progress and procs.is_main and desc)
    if procs.state is None:
        return ids, vectors, owner
    parts = procs.gather([(ids, vectors, owner)])
    all_ids: list[str] = []
    for part_ids, _, part_owner in parts:
        part_owner += len(all_ids)
        all_ids.extend(part_ids)
    return all_ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def resolve_checkpoint(cfg: RerankConfig) -> Path:
    """The descriptor checkpoint to use (the shipped one by default)."""
    return _existing(cfg.descriptor_checkpoint, DEFAULT_CHECKPOINT, "descriptor", "scripts/train_descriptor.py")


def _existing(given: str, default: Path, what: str, trainer: str) -> Path:
    path = Path(given) if given else default
    if not path.is_file():
        if not given:
            raise FileNotFoundError(f"no {what} weights shipped in the package ({path} not found): pass a "
                                    f"checkpoint, or train one with {trainer}")
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    return path


def check_config(cfg: RerankConfig, need_output: bool = True) -> None:
    for name in ("queries", "references") + (("output",) if need_output else ()):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.k < 1 or cfg.max_per_query < 0 or cfg.batch_size < 1 or cfg.num_workers < 0 or cfg.chunk_queries < 1:
        raise ValueError("--k, --batch-size and --chunk-queries must be >= 1, --max-per-query and "
                         "--num-workers >= 0")
    expand_views(cfg.pair_views)
    if cfg.calibration not in CALIBRATIONS and not Path(cfg.calibration).is_file():
        raise ValueError(f"--calibration must be one of {list(CALIBRATIONS)} or a JSON file; "
                         f"{cfg.calibration} not found")
    if need_output and Path(cfg.output).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists; pass --overwrite to replace it")


def work_folder(cfg: RerankConfig) -> Path:
    if not (cfg.work_dir or cfg.output):
        raise ValueError("--work-dir (or --output, whose .work folder is the default) is required")
    return Path(cfg.work_dir) if cfg.work_dir else Path(cfg.output + ".work")


def reference_index(procs: Processes, model, references: dict[str, Path], report: data.SkipReport,
                    cfg: RerankConfig, folder: Path, cached: bool = False) -> tuple[ix.ReferenceIndex, int]:
    """Load (and check) or start the reference index in `folder`, embed the references missing from it, save
    it back. Returns (index, number of references embedded by this run). An index built with another model or
    other reference views is refused, unless it is the work folder's own cache (`cached`): that one is rebuilt."""
    index = None
    if (folder / ix.META_FILE).is_file():
        try:
            index = ix.ReferenceIndex.load(folder, expected_model_args=ix.model_args_of(model),
                                           expected_fingerprint=ix.model_fingerprint(model),
                                           expected_reference_views=cfg.reference_views)
        except ix.IndexMismatchError as err:
            if not cached:
                raise
            log.warning("rebuilding the cached reference index: %s", err)  # the new one replaces it on save
        else:
            index.nprobe = cfg.nprobe
            stale = len(set(index.ids) - set(references))
            if stale:
                log.warning("%d references in index %s are not in %s; they can still be matched", stale, folder,
                            cfg.references)
    todo = {i: p for i, p in references.items() if index is None or i not in index}
    ids, vectors, owner = embed_split(procs, model, todo, report, cfg.reference_views, cfg, "references")
    if index is None:
        index = ix.ReferenceIndex.build(ids, vectors, cfg.factory, ix.reference_metadata(model, cfg.reference_views),
                                        nprobe=cfg.nprobe, view_owner=owner)
    else:
        index.add(ids, vectors, owner)
    if len(index) == 0:
        raise ValueError(f"no usable reference images in {cfg.references}")
    if procs.is_main and (ids or not (folder / ix.META_FILE).is_file()):
        index.save(folder)
        log.info("saved reference index %s (%d references, %d new)", folder, len(index), len(ids))
    return index, len(ids)


def shortlist_stage(procs: Processes, model, queries: dict[str, Path], references: dict[str, Path],
                    report: data.SkipReport, cfg: RerankConfig, stats: dict[str, float],
                    pair_model=None) -> pd.DataFrame:
    """The k best references of every query by descriptor similarity (cached in the work folder); with token
    recall, some places voted by `pair_model`'s tokens (the pair checkpoint is loaded if not given)."""
    key = {"queries": cache.listing(queries), "references": cache.listing(references),
           "model": ix.model_fingerprint(model),
           **{k: getattr(cfg, k) for k in ("k", "views", "factory", "nprobe", "background", "background_n",
                                           "background_beta", "amp", "subview_penalty", "reference_views",
                                           "reference_penalty")}}
    if cfg.token_recall and not cfg.descriptor_only:
        key.update(token_recall=cfg.token_recall, token_factory=cfg.token_factory, token_nprobe=cfg.token_nprobe,
                   # only when on: plain-vote shortlists cached before the option keep their key
                   pair=_pair_fingerprint(cfg), **({"token_geometry": True} if cfg.token_geometry else {}),
                   **({"token_views": cfg.token_views} if cfg.token_views and cfg.token_geometry else {}),
                   columns="votes")  # shortlists cached before the votes column are made again
    folder = cache.stage_dir(work_folder(cfg) / "shortlist", key, procs)
    if (folder / "shortlist.csv").is_file():
        cache.load_report(folder / "skipped.json", report)
        log.info("reusing the shortlist cached in %s", folder)
        return pd.read_csv(folder / "shortlist.csv", dtype={"query_id": str, "reference_id": str})
    index_dir = Path(cfg.index) if cfg.index else work_folder(cfg) / "ref_index"
    index, stats["embedded"] = reference_index(procs, model, references, report, cfg, index_dir,
                                               cached=not cfg.index)
    background = None
    if cfg.background:
        b_ids, b_vectors, _ = embed_split(procs, model, data.list_images(cfg.background), report, "full", cfg,
                                          "background")
        if not b_ids:
            raise ValueError(f"no usable background images in {cfg.background}")
        background = ix.ReferenceIndex.build(b_ids, b_vectors, "Flat")
        stats["embedded"] += len(b_ids)
    q_ids, q_vectors, owner = ix.embed_folder(
        model, procs.share(queries), cfg.batch_size, cfg.amp, cfg.views, report, cfg.num_workers,
        progress=cfg.progress and procs.is_main and "queries")
    stats["embedded"] += len(queries)
    voting = cfg.token_recall and not cfg.descriptor_only  # --descriptor-only: the descriptor alone, no pair model
    depth = cfg.k * TOKEN_DEPTH if voting else cfg.k  # voted references keep their similarity if listed
    mine = ix.search_views(index, q_ids, q_vectors, owner, depth, background, cfg.background_n,
                           cfg.background_beta, progress=cfg.progress and procs.is_main and "search",
                           subview_penalty=cfg.subview_penalty, reference_penalty=cfg.reference_penalty)
    if voting:
        from pair_vit.match.placed_views import view_reader

        mine_queries = {q: queries[q] for q in q_ids}
        mine = token_shortlist(procs, mine, mine_queries, references, report, cfg, stats, pair_model,
                               view_reader(model, index, mine_queries, depth, cfg, report))
    # Every process takes the shortlist as written to the cache, so a fresh and a resumed run continue from
    # exactly the same values.
    text = pd.concat(procs.gather([mine]), ignore_index=True).to_csv(index=False, float_format="%.8g")
    _merge_reports(procs, report)
    if procs.is_main:
        cache.save_report(folder / "skipped.json", report)
        write_text_atomic(folder / "shortlist.csv", text)
    return pd.read_csv(io.StringIO(text), dtype={"query_id": str, "reference_id": str})


def token_shortlist(procs: Processes, deep: pd.DataFrame, queries: dict[str, Path], references: dict[str, Path],
                    report: data.SkipReport, cfg: RerankConfig, stats: dict[str, float],
                    model=None, read_views=None) -> pd.DataFrame:
    """This process's queries' k-candidate shortlists from their `deep` descriptor lists, the last
    `cfg.token_recall` places given to the references their local tokens vote for (`pair_vit.match.token_recall`),
    with every candidate's votes; `read_views`: the descriptor's reading of the boxes the votes place
    (`pair_vit.match.placed_views.view_reader`, used with `cfg.token_views`)."""
    from pair_vit.match import token_readings as readings
    from pair_vit.match import token_recall as tr

    start = time.perf_counter()
    settings = tr.settings_of(cfg)
    model = (model if model is not None else load_pair(cfg)[0]).eval()
    if not hasattr(model, "forward_tokens"):  # the pixel pair ViT has no token trunk to vote with
        log.warning("token recall skipped: pair checkpoint %s has no token trunk", cfg.checkpoint or SHIPPED_WEIGHTS)
        return tr.merge_votes(deep, deep.iloc[:0], cfg.k, 0)
    parts = procs.gather([readings.reference_tokens(model, procs.share(references), report, cfg.batch_size,
                                                    cfg.amp)])
    ids = [i for part_ids, _ in parts for i in part_ids]
    index = tr.TokenIndex.build(ids, np.concatenate([t for _, t in parts]), settings.factory)
    rows = readings.query_rows(model, queries, settings.scales, report, cfg.batch_size, cfg.amp)
    shortlist = tr.vote_shortlist(index, deep, rows, cfg.k, settings, read_views)
    stats["token_recall_seconds"] = time.perf_counter() - start
    return shortlist


def _pair_fingerprint(cfg: RerankConfig) -> str:
    """A hash of the pair checkpoint's bytes (its tokens vote in the shortlist with --token-recall)."""
    import hashlib

    path = Path(cfg.checkpoint) if cfg.checkpoint else SHIPPED_WEIGHTS
    return hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest() if path.is_file() else ""


def _image_listings(queries: dict[str, Path], references: dict[str, Path]) -> list[str]:
    """Digests of the query and reference folder listings: a pair-stage cache keyed on them is dropped when an
    image file changes under the same id."""
    return [cache.listing(queries), cache.listing(references)]


def _merge_reports(procs: Processes, report: data.SkipReport) -> None:
    entries = [e for part in procs.gather([report.entries]) for e in part]
    report.entries = list(dict.fromkeys(entries))  # references/background are read by one process each


def load_pair(cfg: RerankConfig):
    """(pair ViT, its checkpoint metadata, the calibration to apply); refuses non-pair checkpoints."""
    from pair_vit.pair.model import load_pair_model

    path = _existing(cfg.checkpoint, SHIPPED_WEIGHTS, "pair-ViT", "scripts/train_pairs.py")
    model, meta = load_pair_model(path)
    if cfg.calibration == "none":
        calibration = Calibration()
    elif cfg.calibration == "checkpoint":
        calibration = stored_calibration(meta)
    else:
        calibration = Calibration.read(cfg.calibration)
    return model, meta, calibration


def stored_calibration(meta: dict) -> Calibration:
    """The calibration stored in a pair checkpoint's metadata (the identity if none)."""
    stored = (meta.get("extra") or {}).get("calibration")
    return Calibration.from_dict(stored) if stored else Calibration()


def pair_stage(procs: Processes, model, shortlist: pd.DataFrame, queries: dict[str, Path],
               references: dict[str, Path], report: data.SkipReport, cfg: RerankConfig,
               stats: dict[str, float]) -> pd.DataFrame:
    """Pair-ViT logits for every shortlisted pair (cached chunk by chunk in the work folder)."""
    shortlist = shortlist[list(PAIR_COLUMNS)]  # the votes are the calibration's, not the pair model's input
    # No shortlist in the key: results are reused pair by pair (`pair_vit.cache`), so a new shortlist scores
    # only its new pairs; the folder is dropped when what scores a pair changes (an image file too).
    key = {"images": _image_listings(queries, references),
           "model": ix.model_fingerprint(model), "views": expand_views(cfg.pair_views),
           # what the model reads besides its weights: the same weights localizing or not score differently
           "reads": {k: model.model_args.get(k) for k in ("input_size", "localize")},
           "amp": cfg.amp, "reuse": "pairs"}
    folder = cache.stage_dir(work_folder(cfg) / "pairs", key, procs)
    start = time.perf_counter()
    rows, n_scored = score_shortlist(model, shortlist, queries, references, cfg.pair_views, report, folder,
                                     cfg.chunk_queries, cfg.batch_size, cfg.amp, procs.rank, procs.world,
                                     progress=cfg.progress and procs.is_main)
    rows = pd.concat(procs.gather([rows]), ignore_index=True)
    stats["pairs_scored"] = float(sum(procs.gather([n_scored])))
    stats["pair_seconds"] = time.perf_counter() - start
    _merge_reports(procs, report)
    return rows


def verify_stage(procs: Processes, shortlist: pd.DataFrame, queries: dict[str, Path], references: dict[str, Path],
                 report: data.SkipReport, cfg: RerankConfig, stats: dict[str, float]) -> pd.DataFrame:
    """SIFT RANSAC inliers of every shortlisted pair: query_id, reference_id, inliers (cached chunk by chunk)."""
    shortlist = shortlist[list(PAIR_COLUMNS)]
    key = {"images": _image_listings(queries, references),  # no shortlist: see pair_stage
           "verify": cfg.verify, "method": VERIFY_METHOD, "reuse": "pairs"}
    folder = cache.stage_dir(work_folder(cfg) / "verify", key, procs)
    start = time.perf_counter()
    rows, n_verified = verify_shortlist(shortlist, queries, references, report, folder, cfg.chunk_queries,
                                        procs.rank, procs.world, progress=cfg.progress and procs.is_main)
    rows = pd.concat(procs.gather([rows]), ignore_index=True)
    stats["pairs_verified"] = float(sum(procs.gather([n_verified])))
    stats["verify_seconds"] = time.perf_counter() - start
    _merge_reports(procs, report)
    return rows


def match(cfg: RerankConfig, load_model: Callable[[Path], Any] | None = None,
          procs: Processes | None = None) -> Matches:
    """Shortlist (and unless `descriptor_only`, pair-score) every query; every process returns the result."""
    check_config(cfg, need_output=False)
    procs = procs or Processes()
    references = data.list_images(cfg.references)
    if not references:
        raise ValueError(f"no reference images in {cfg.references}")
    queries = data.list_images(cfg.queries)
    checkpoint = resolve_checkpoint(cfg)
    report, stats = data.SkipReport(), {"queries": len(queries), "references": len(references)}
    pair = None if cfg.descriptor_only else load_pair(cfg)  # refuse a wrong checkpoint before any long work
    if pair is not None:
        check_calibration(pair[2], cfg.verify, cfg.token_recall)
    if not queries:
        log.warning("no query images in %s: writing a header-only submission", cfg.queries)
        return Matches(ix.empty_submission(), report, pair[2] if pair else None, stats,
                       stored_calibration=stored_calibration(pair[1]) if pair else None)
    if load_model is None:
        from pair_vit.descriptor.model import load_descriptor

        load_model = lambda path: load_descriptor(path)[0]  # noqa: E731
    model = load_model(checkpoint).to(procs.device).eval()
    rows = shortlist_stage(procs, model, queries, references, report, cfg, stats,
                           pair[0].to(procs.device) if pair is not None else None)
    if pair is None:
        return Matches(rows, report, None, stats, margin=cfg.margin)
    scored = pair_stage(procs, pair[0].to(procs.device), rows, queries, references, report, cfg, stats)
    if "votes" in rows:
        scored = scored.merge(rows[["query_id", "reference_id", "votes"]], on=["query_id", "reference_id"],
                              how="left", validate="one_to_one")
    if cfg.verify != "none":
        verified = verify_stage(procs, rows, queries, references, report, cfg, stats)
        scored = scored.merge(verified, on=["query_id", "reference_id"], how="inner", validate="one_to_one")
    return Matches(scored, report, pair[2], stats, stored_calibration=stored_calibration(pair[1]))


def check_calibration(calibration: Calibration, verify: str, token_recall: int) -> None:
    """Refuse settings that do not produce a feature the score calibration weighs."""
    if calibration.needs_inliers and verify == "none":
        raise ValueError("the score calibration uses SIFT verification (RANSAC inliers): drop --verify none, or "
                         "pass --calibration none or a calibration fitted with scripts/calibrate.py --verify none")
    if calibration.needs_votes and not token_recall:
        raise ValueError("the score calibration uses token-recall votes: drop --token-recall 0, or pass "
                         "--calibration none or a calibration fitted with scripts/calibrate.py --token-recall 0")


def finalise(submission: pd.DataFrame, max_per_query: int) -> pd.DataFrame:
    """Sorted, capped and validated submission: no duplicate pair, finite scores, <= max_per_query per query."""
    submission = submission.sort_values(["query_id", "score", "reference_id"], ascending=[True, False, True],
                                        kind="stable")
    submission = submission.groupby("query_id", sort=False).head(max_per_query).reset_index(drop=True)
    checked = evaluation.validate_submission(submission, "submission")
    per_query = checked.groupby("query_id").size()
    if len(per_query) and per_query.max() > max_per_query:
        raise AssertionError(f"{per_query.idxmax()} has {per_query.max()} rows > {max_per_query}")
    return checked


def write_outputs(submission: pd.DataFrame, report: data.SkipReport, cfg: RerankConfig) -> None:
    out = Path(cfg.output)
    with atomic_path(out) as tmp:
        submission.to_csv(tmp, index=False, float_format="%.10g")
    skipped = out.with_name(out.name + ".skipped.csv")
    if len(report):
        report.write_csv(skipped)
        log.warning("%s; listed in %s", report.summary(), skipped)
    elif skipped.exists():
        skipped.unlink()  # left by an earlier run of the output we just replaced
    save_config(cfg, out.with_name(out.name + ".config.yaml"))


def summary_line(cfg: RerankConfig, found: Matches, n_rows: int, wall: float, world: int) -> str:
    s = found.stats
    line = (f"rerank ({'descriptor only' if cfg.descriptor_only else 'pair ViT'}): {s['queries']} queries, "
            f"{s['references']} references, {len(found.report)} unreadable skipped")
    if "pairs_scored" in s:
        rate = s["pairs_scored"] / max(s["pair_seconds"], 1e-9)
        line += f", {int(s['pairs_scored'])} pairs scored ({rate:.0f} pairs/s)"
    if "pairs_verified" in s:
        line += f", {int(s['pairs_verified'])} verified in {s['verify_seconds']:.1f} s"
    line += f", {n_rows} rows -> {cfg.output}; {wall:.1f} s wall"
    if s["queries"]:
        line += f", {wall / s['queries']:.3f} s/query"
    return line + (f" ({world} processes)" if world > 1 else "")


# ----------------------------------------------------------------------------- run


def run(cfg: RerankConfig, load_model: Callable[[Path], Any] | None = None) -> pd.DataFrame:
    """Write the submission described by `cfg` and return it (every process returns it)."""
    start = time.perf_counter()
    check_config(cfg)
    procs = Processes()
    found = match(cfg, load_model, procs)
    submission = finalise(found.submission(), min(cfg.k, cfg.max_per_query or cfg.k))
    if procs.is_main:
        write_outputs(submission, found.report, cfg)
        print(summary_line(cfg, found, len(submission), time.perf_counter() - start, procs.world),
              file=sys.stdout, flush=True)
    return submission
