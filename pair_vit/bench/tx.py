"""Figures of the ThreatExchange extension (`pair_vit.tx`) next to threatexchange's own PDQ signal type.

    python scripts/bench_tx.py --benchmark benchmarks/dev --write-calibration

Everything goes through the signal types' own paths: `hash_from_file` for every image, the index class's
`build` / `query` / `query_top_k` (PDQ: `PdqSignal.get_index_cls()` for its default threshold, threatexchange's
`PDQIndex2` with an open threshold to rank every pair for uAP). Scored with `pair_vit.metrics` (micro-AP):
  - per candidate `views` packed in a pair-vit signal: its descriptor-only calibration (cross-fitted precision-90
    cut, `pair_vit.tx.calibration.fit_similarity`), recall and precision at that default threshold, uAP and
    recall@1 over each query's top `k`, hashing images/s, bytes per signal;
  - PDQ: the same at its default distance 31;
  - `--rotations`: a copy of the benchmark whose queries are each rotated or flipped (one of the 7 non-identity
    rotations/flips, seeded), matched plainly and through the CLI's `match --rotations` path (the 8 rotations
    of `PhotoContent.all_simple_rotations`, each hashed and queried); also the --rotations path on the
    unrotated benchmark (what the 7 extra tries cost in false matches); time per query;
  - index query time per signal and index bytes per signal at `sizes` signals (the benchmark's references plus
    random signals), for both signal types.
`--write-calibration` stores the chosen views' fit in pair_vit/weights/tx_calibration.json.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pair_vit import data, demo_dir, metrics
from pair_vit.config import opt, save_config
from pair_vit.io import write_text_atomic

# The 7 non-identity rotations and flips of a photo (the dihedral group the CLI's --rotations undoes).
TRANSPOSES = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
              Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
              Image.Transpose.TRANSVERSE)
PDQ_OPEN_THRESHOLD = 256  # every pair of 256-bit hashes: ranks all pairs for uAP


@dataclass
class TxBenchConfig:
    """Measure the pair-vit ThreatExchange signal type against PDQ through threatexchange's own interfaces."""

    benchmark: str = opt("benchmarks/dev", "benchmark folder (scripts/make_benchmark.py)")
    views: list = opt(["full"], "views packed per signal, one set of figures each (full, halves, regions)")
    calibrate_views: str = opt("full", "views whose fit --write-calibration stores (the signal type's default)")
    k: int = opt(10, "top-k signals per query scored for uAP and recall@1")
    rotations: bool = opt(True, "measure rotated/flipped copies and the CLI's --rotations path")
    sizes: list = opt([10000, 100000], "index sizes (signals) for query time and memory (0: skip)")
    n_timed: int = opt(200, "queries timed per index size (median)")
    threads: int = opt(1, "torch and faiss threads (the machine is shared)")
    seed: int = opt(0, "seed of the rotations and the random signals")
    write_calibration: bool = opt(False, "write pair_vit/weights/tx_calibration.json from the dev fit")
    out: str = opt("runs/bench_tx", "folder for results.json and results.md")


# ----------------------------------------------------------------------------- hashing and matching


def hash_images(signal_type, images: dict[str, Path]) -> tuple[dict[str, str], float]:
    """id -> signal of every image `signal_type.hash_from_file` hashes (empty hashes dropped); images/s."""
    start = time.perf_counter()
    signals = {image_id: signal_type.hash_from_file(path) for image_id, path in images.items()}
    rate = len(images) / max(time.perf_counter() - start, 1e-9)
    return {i: s for i, s in signals.items() if s}, rate


def query_rows(index, queries: dict[str, str], how: str, k: int = 0) -> pd.DataFrame:
    """query_id, reference_id, distance of every match `index` returns for each query signal.
    how: "query" (the index's default threshold) or "top_k" (`query_top_k(signal, k)`)."""
    rows = []
    for query_id, signal in queries.items():
        matches = index.query(signal) if how == "query" else index.query_top_k(signal, k)
        rows.extend((query_id, m.metadata, float(m.similarity_info.distance)) for m in matches)
    return pd.DataFrame(rows, columns=["query_id", "reference_id", "distance"])


def best_per_pair(rows: pd.DataFrame) -> pd.DataFrame:
    """Several tries of one query (rotations) -> the smallest distance per (query, reference)."""
    return rows.groupby(["query_id", "reference_id"], as_index=False)["distance"].min()


def scores(rows: pd.DataFrame, gt: pd.DataFrame, scale: float = 1.0) -> dict:
    """uAP, recall@1, recall@P90 and the distance of that cut (in-sample) of ranked rows (score = 1 - distance /
    scale: higher = more likely a copy)."""
    m = metrics.evaluate(rows.assign(score=1.0 - rows.distance / scale)[["query_id", "reference_id", "score"]], gt)
    cut = None if m.threshold_at_p90 is None else (1.0 - m.threshold_at_p90) * scale
    return {"uap": m.uap, "recall_at_1": m.recall_at_1, "recall_at_p90": m.recall_at_p90, "distance_at_p90": cut}


def at_threshold(rows: pd.DataFrame, gt: pd.DataFrame) -> dict:
    """Precision and recall of the matches a threshold query returned (every row is a reported match)."""
    positive = metrics.label_predictions(rows, gt)
    return {"matches": len(rows), "true": int(positive.sum()),
            "precision": float(positive.mean()) if len(rows) else float("nan"),
            "recall": float(positive.sum() / len(gt)) if len(gt) else float("nan")}


# ----------------------------------------------------------------------------- the two signal types


def provisional_settings(views: str):
    """TxCalibration for `views` with the shipped weights' fingerprint, before its calibration is fitted."""
    from pair_vit.descriptor import SHIPPED_WEIGHTS, load_descriptor
    from pair_vit.descriptor.views import REFERENCE_SUBVIEW_PENALTY, SUBVIEW_PENALTY, model_fingerprint
    from pair_vit.tx.calibration import TxCalibration

    model, _ = load_descriptor(SHIPPED_WEIGHTS)
    return TxCalibration(fingerprint=model_fingerprint(model), dim=model.embed_dim, views=views,
                         query_penalty=SUBVIEW_PENALTY, reference_penalty=REFERENCE_SUBVIEW_PENALTY,
                         calibration={}, similarity_p90=0.0)


def measure_pair_vit(cfg: TxBenchConfig, layout: data.DiscLayout, views: str) -> dict:
    """Hash, calibrate, index and score one choice of views; the fitted settings ride along in "settings"."""
    from pair_vit.tx import PairVitSignal, hasher
    from pair_vit.tx.calibration import fit_similarity

    gt = layout.load_ground_truth()
    settings = provisional_settings(views)
    with hasher.use(settings):
        refs, ref_rate = hash_images(PairVitSignal, layout.reference_images())
        queries, query_rate = hash_images(PairVitSignal, layout.query_images())
        index = PairVitSignal.get_index_cls().build((s, i) for i, s in refs.items())
        top = query_rows(index, queries, "top_k", cfg.k)
        labels = metrics.label_predictions(top, gt)
        cal, cut, honest_recall = fit_similarity(top.query_id.to_numpy(), 1.0 - top.distance.to_numpy(),
                                                 labels, len(gt))
        settings.calibration, settings.similarity_p90 = cal.to_dict(), cut
        settings.fitted_on = f"{cfg.benchmark}: {cal.fitted_on} (top {cfg.k} per query), views {views}"
        thresholded = query_rows(PairVitSignal.get_index_cls().build((s, i) for i, s in refs.items()), queries,
                                 "query")
    signal_chars = int(np.mean([len(s) for s in [*refs.values(), *queries.values()]]))
    return {"signal": "pair_vit", "views": views, "settings": settings, "refs": refs, "queries": queries,
            "hash_images_per_s": {"references": ref_rate, "queries": query_rate},
            "unhashed": len(layout.reference_images()) + len(layout.query_images()) - len(refs) - len(queries),
            "threshold": settings.distance_threshold, "probability_at_threshold": cal.threshold_p90,
            "cross_fitted_recall_at_p90": honest_recall, **scores(top, gt), "default": at_threshold(thresholded, gt),
            "signal_bytes": signal_chars, "index_bytes_per_signal": index.memory_bytes() / max(len(index), 1)}


def measure_pdq(cfg: TxBenchConfig, layout: data.DiscLayout) -> dict:
    """The same figures for threatexchange's PDQ signal type (no calibration: its default distance 31)."""
    from threatexchange.signal_type.pdq.pdq_index2 import PDQIndex2
    from threatexchange.signal_type.pdq.signal import PdqSignal

    gt = layout.load_ground_truth()
    refs, ref_rate = hash_images(PdqSignal, layout.reference_images())
    queries, query_rate = hash_images(PdqSignal, layout.query_images())
    index = PdqSignal.get_index_cls().build((s, i) for i, s in refs.items())
    open_index = PDQIndex2(entries=((s, i) for i, s in refs.items()), threshold=PDQ_OPEN_THRESHOLD)
    ranked = query_rows(open_index, queries, "query")
    top = nearest(ranked, cfg.k)
    return {"signal": "pdq", "views": "-", "refs": refs, "queries": queries,
            "hash_images_per_s": {"references": ref_rate, "queries": query_rate},
            "unhashed": len(layout.reference_images()) + len(layout.query_images()) - len(refs) - len(queries),
            "threshold": index.get_match_threshold(), **scores(top, gt, scale=PDQ_OPEN_THRESHOLD),
            "default": at_threshold(query_rows(index, queries, "query"), gt), "signal_bytes": 64,
            "index_bytes_per_signal": 32}


# ----------------------------------------------------------------------------- rotations


def make_rotated(layout: data.DiscLayout, out: Path, seed: int) -> data.DiscLayout:
    """A copy of the benchmark whose every query is rotated or flipped (one of TRANSPOSES, seeded); the
    references folder and ground truth are the same. Rebuilt from scratch each run."""
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "queries").mkdir(parents=True)
    for image_id, path in layout.query_images().items():
        op = TRANSPOSES[int(rng.integers(len(TRANSPOSES)))]
        data.load_image(path).transpose(op).save(out / "queries" / f"{image_id}.jpg", quality=95)
    (out / "references").symlink_to(layout.references.resolve(), target_is_directory=True)
    shutil.copyfile(layout.ground_truth, out / "ground_truth.csv")
    return data.DiscLayout.from_root(out)


def rotation_rows(signal_type, index, images: dict[str, Path], how: str, k: int) -> tuple[pd.DataFrame, float]:
    """The CLI's `match --rotations` path: the 8 rotations of each query hashed and queried, the best distance
    per (query, reference) kept, then the query's `k` nearest. Returns the rows and the seconds per query."""
    from threatexchange.content_type.photo import PhotoContent

    rows, start = [], time.perf_counter()
    for image_id, path in images.items():
        for rotated in PhotoContent.all_simple_rotations(path.read_bytes()).values():
            signal = signal_type.hash_from_bytes(rotated)
            if signal:
                rows.append(query_rows(index, {image_id: signal}, how, k))
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    empty = pd.DataFrame(columns=["query_id", "reference_id", "distance"])
    return nearest(best_per_pair(pd.concat(rows) if rows else empty), k), seconds


def nearest(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    """The `k` smallest distances of each query."""
    return rows.sort_values(["query_id", "distance"], kind="stable").groupby("query_id").head(k)


def summary(rows: pd.DataFrame, gt: pd.DataFrame, threshold: float, scale: float) -> dict:
    """Ranked rows -> the matches at `threshold`, uAP, recall@P90 and the distance of that P90 cut (in-sample)."""
    return {**at_threshold(rows[rows.distance <= threshold], gt), **scores(rows, gt, scale)}


def measure_rotations(cfg: TxBenchConfig, layout: data.DiscLayout, rotated: data.DiscLayout, signal_type,
                      ranking, how: str, threshold: float, scale: float = 1.0) -> dict:
    """Plain vs --rotations matching of rotated copies, and --rotations on the unrotated queries, each ranked by
    `ranking` (an index answering `how` with every candidate: top k, or an open threshold)."""
    gt = layout.load_ground_truth()
    plain, plain_rate = hash_images(signal_type, rotated.query_images())
    out = {"plain": {**summary(nearest(query_rows(ranking, plain, how, cfg.k), cfg.k), gt, threshold, scale),
                     "seconds_per_query": 1.0 / plain_rate}}
    for name, bench in (("rotations", rotated), ("rotations_on_unrotated", layout)):
        rows, seconds = rotation_rows(signal_type, ranking, bench.query_images(), how, cfg.k)
        out[name] = {**summary(rows, gt, threshold, scale), "seconds_per_query": seconds}
    return out


def rotation_figures(cfg: TxBenchConfig, layout: data.DiscLayout, pv: dict, pdq: dict) -> dict:
    from threatexchange.signal_type.pdq.pdq_index2 import PDQIndex2
    from threatexchange.signal_type.pdq.signal import PdqSignal

    from pair_vit.tx import PairVitSignal, hasher

    rotated = make_rotated(layout, Path(f"{cfg.benchmark.rstrip('/')}-rot"), cfg.seed)
    with hasher.use(pv["settings"]):
        ranking = PairVitSignal.get_index_cls().build((s, i) for i, s in pv["refs"].items())
        out = {"pair_vit": measure_rotations(cfg, layout, rotated, PairVitSignal, ranking, "top_k",
                                             pv["settings"].distance_threshold)}
    ranking = PDQIndex2(entries=((s, i) for i, s in pdq["refs"].items()), threshold=PDQ_OPEN_THRESHOLD)
    out["pdq"] = measure_rotations(cfg, layout, rotated, PdqSignal, ranking, "query", pdq["threshold"],
                                   PDQ_OPEN_THRESHOLD)
    return out


# ----------------------------------------------------------------------------- query time and memory


def random_pair_vit_signals(n: int, settings, rng: np.random.Generator) -> list[str]:
    from pair_vit.descriptor.views import n_views
    from pair_vit.tx import codec

    v = rng.standard_normal((n, n_views(settings.views), settings.dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    return [codec.encode(x, settings.fingerprint) for x in v]


def time_index(index_cls, reference_signals: list[str], fill: list[str], queries: list[str], k: int,
               n_timed: int) -> dict:
    """Median seconds per `query` (and `query_top_k`, where the index has it) over `n_timed` queries, on an
    index of the references plus `fill`; build seconds; index bytes per signal where measurable."""
    start = time.perf_counter()
    index = index_cls.build((s, i) for i, s in enumerate([*reference_signals, *fill]))
    out = {"signals": len(reference_signals) + len(fill), "build_s": time.perf_counter() - start}
    timed = (queries * (n_timed // max(len(queries), 1) + 1))[:n_timed]
    for name in ("query", "query_top_k"):
        if not hasattr(index, name):
            continue
        call = (lambda q: index.query(q)) if name == "query" else (lambda q: index.query_top_k(q, k))
        ticks = []
        for q in timed:
            t0 = time.perf_counter()
            call(q)
            ticks.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1000 * float(np.median(ticks))
    if hasattr(index, "memory_bytes"):
        out["index_bytes_per_signal"] = index.memory_bytes() / len(index)
    return out


def measure_scaling(cfg: TxBenchConfig, pv: dict, pdq: dict) -> list[dict]:
    from threatexchange.signal_type.pdq.signal import PdqSignal

    from pair_vit.tx import PairVitSignal, hasher

    rng, rows = np.random.default_rng(cfg.seed), []
    for size in [s for s in cfg.sizes if s > 0]:
        with hasher.use(pv["settings"]):
            fill = random_pair_vit_signals(max(0, size - len(pv["refs"])), pv["settings"], rng)
            rows.append({"signal": "pair_vit", "views": pv["views"], **time_index(
                PairVitSignal.get_index_cls(), list(pv["refs"].values()), fill, list(pv["queries"].values()),
                cfg.k, cfg.n_timed)})
        fill = [PdqSignal.get_random_signal() for _ in range(max(0, size - len(pdq["refs"])))]
        rows.append({"signal": "pdq", "views": "-", **time_index(
            PdqSignal.get_index_cls(), list(pdq["refs"].values()), fill, list(pdq["queries"].values()), cfg.k,
            cfg.n_timed)})
    return rows


# ----------------------------------------------------------------------------- run


def demo_examples() -> list[str]:
    """Signals of two demo photos, for PairVitSignal.get_examples (the CLI's "sample" collaboration)."""
    from pair_vit.tx import PairVitSignal

    photos = data.list_images(Path(str(demo_dir())) / "skimage")
    return [PairVitSignal.hash_from_file(photos[name]) for name in ("chelsea", "rocket")]


def run(cfg: TxBenchConfig) -> dict:
    import faiss
    import torch

    from pair_vit.tx import PairVitSignal, hasher

    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    out, layout = Path(cfg.out), data.DiscLayout.from_root(cfg.benchmark)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    pdq = measure_pdq(cfg, layout)
    candidates = {views: measure_pair_vit(cfg, layout, views) for views in cfg.views}
    chosen = candidates[cfg.calibrate_views]
    results = {"command": " ".join(["python", *sys.argv]), "cpu": cpu_line(),
               "matching": [public(r) for r in (pdq, *candidates.values())]}
    if cfg.rotations:
        results["rotations"] = rotation_figures(cfg, layout, chosen, pdq)
    results["scaling"] = measure_scaling(cfg, chosen, pdq)
    if cfg.write_calibration:
        settings = chosen["settings"]
        settings.command = results["command"]
        with hasher.use(settings):
            settings.examples = demo_examples()
        settings.write()
        results["calibration_written"] = dataclasses.asdict(settings)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(out / "results.md", report(results))
    print(report(results))
    return results


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("settings", "refs", "queries")}


def cpu_line() -> str:
    import os
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end"


def report(results: dict) -> str:
    """results.json as markdown tables."""
    matching = pd.json_normalize(results["matching"])
    parts = [f"command: `{results['command']}`", f"CPU: {results['cpu']}", "", matching.to_markdown(index=False)]
    if "rotations" in results:
        rot = pd.json_normalize([{"signal": s, "path": p, **v} for s, paths in results["rotations"].items()
                                 for p, v in paths.items()])
        parts += ["", rot.to_markdown(index=False)]
    parts += ["", pd.DataFrame(results["scaling"]).to_markdown(index=False)]
    return "\n".join(parts) + "\n"
