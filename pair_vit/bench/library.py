"""Benchmark of the library API (`pair_vit.CopyDetector`): a saved collection of real photos, one query at a time.

    python scripts/bench_index.py --out runs/bench_index        # 10,000 references + 1,000 added, 20 queries

What it measures, on the CPU it runs on (recorded with the load average, which should be ~0):
  - building the collection (embedding, reference artefacts, save) and loading it back;
  - one query end to end (`detector.match(path)`: decoding, descriptor views, shortlist, pair ViT, SIFT
    verification, calibration) at the default settings, median over `n_queries` edited copies of indexed photos
    (`pair_vit.edits`), in fp32 (`amp=False`) and with the default bf16 autocast where the CPU has native bf16;
  - adding `n_added` references to the saved collection: time per reference against the build's, and whether the
    earlier references' vectors are unchanged bit for bit (in memory and in the saved index);
  - bytes per reference: the saved faiss index, RAM (RSS growth when loading the index alone), the reference store
    on disk; the largest collection the Flat index holds in 24 GiB of RAM;
  - IVF-PQ against Flat on the same vectors (`compare._nlist` lists, PQ32): build time, bytes per reference,
    search time, and recall: the share of Flat's top-k shortlist it returns and how often the true source is in
    the top k, for `recall_queries` edited copies; plus `compare.search_scaling` on random vectors at larger sizes.

The real photos are `images` (default: ../shared/data/train and the demo photos, 4,281 in all); when fewer than
`n_references + n_added`, mirrored and centre-cropped variants of them (real pixels, near duplicates) fill the
rest and the report says how many.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import ImageOps

from pair_vit import data, demo_dir
from pair_vit.config import opt, save_config
from pair_vit.io import write_text_atomic

GIB = 1024 ** 3
VARIANTS = ("mirror", "crop", "mirror_crop")


@dataclass
class IndexBenchConfig:
    """Time a saved CopyDetector collection: build, load, one-query match, incremental add, memory, IVF-PQ."""

    images: list = opt([], "folders of real photos (default: ../shared/data/train and the package's demo photos)")
    n_references: int = opt(10000, "references in the saved collection (variants of the photos fill up to it)")
    n_added: int = opt(1000, "references added to the saved collection afterwards")
    n_queries: int = opt(20, "edited copies of indexed photos matched one at a time (median time)")
    recall_queries: int = opt(200, "edited copies searched for the IVF-PQ vs Flat recall")
    k: int = opt(20, "shortlist size compared between IVF-PQ and Flat")
    nprobes: list = opt([16, 64], "IVF lists visited per query, one recall row each")
    scaling_sizes: list = opt([100000, 1000000], "random-vector index sizes for compare.search_scaling (0: skip)")
    out: str = opt("runs/bench_index", "folder for the collection, the photos written, results.json, results.md")
    seed: int = opt(0, "seed for the order of photos, the queried photos and their edits")
    progress: bool = opt(True, "progress bars while building")


# ----------------------------------------------------------------------------- inputs


def real_photos(folders: list[str]) -> dict[str, Path]:
    """id -> path of every photo under `folders` (an id seen in an earlier folder gets the folder's name prefixed)."""
    folders = folders or ["../shared/data/train", str(demo_dir())]
    photos: dict[str, Path] = {}
    for folder in folders:
        for image_id, path in data.list_images(folder).items():
            photos[image_id if image_id not in photos else f"{Path(folder).name}_{image_id}"] = path
    return photos


def fill_with_variants(photos: dict[str, Path], needed: int, folder: Path) -> dict[str, Path]:
    """`photos` plus mirrored / centre-cropped variants written to `folder` until there are `needed` images."""
    out = dict(photos)
    folder.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        for image_id, path in photos.items():
            if len(out) >= needed:
                return out
            target = folder / f"{image_id}_{variant}.jpg"
            if not target.is_file():
                try:
                    image = data.load_image(path)
                except data.ImageLoadError:
                    continue
                if "crop" in variant:
                    w, h = image.size
                    image = image.crop((w // 10, h // 10, w - w // 10, h - h // 10))
                (ImageOps.mirror(image) if "mirror" in variant else image).save(target, quality=95)
            out[target.stem] = target
    return out


def edited_queries(sources: dict[str, Path], n: int, folder: Path, seed: int) -> dict[str, str]:
    """`n` edited copies (`pair_vit.edits`, intensity 0.2-0.8) of photos of `sources`, written to `folder` as
    q<i>.jpg; returns query id -> the id of its source."""
    from pair_vit import edits

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = sorted(sources)
    truth = {}
    for i, pick in enumerate(rng.choice(len(ids), size=min(n, len(ids)), replace=False)):
        image = data.load_image(sources[ids[pick]])
        query, _ = edits.make_query(image, rng, intensity=float(rng.uniform(0.2, 0.8)))
        query.convert("RGB").save(folder / f"q{i:05d}.jpg", quality=90)
        truth[f"q{i:05d}"] = ids[pick]
    return truth


# ----------------------------------------------------------------------------- measurements


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
    """CPU model, cores, native bf16, torch threads and the load average (a busy machine slows every figure)."""
    import torch

    from pair_vit import precision

    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": precision.native_bf16("cpu"),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def time_queries(detector, queries: list[Path], truth: dict[str, str], amp: bool) -> dict[str, float]:
    """Median / p90 seconds of `detector.match(one path)` and how often the top row is the true source."""
    detector.settings.amp = amp
    detector.match(queries[0])  # warm-up: first forward passes, allocator
    seconds, correct = [], 0
    for path in queries:
        start = time.perf_counter()
        found = detector.match(path, k=1)
        seconds.append(time.perf_counter() - start)
        correct += bool(len(found)) and found.reference_id.iloc[0] == truth[path.stem]
    return {"median_s": float(np.median(seconds)), "p90_s": float(np.quantile(seconds, 0.9)),
            "mean_s": float(np.mean(seconds)), "top1": correct / len(queries)}


def ivf_against_flat(detector, queries: dict[str, Path], truth: dict[str, str], k: int,
                     nprobes: list[int]) -> list[dict[str, Any]]:
    """Flat vs IVF-PQ (compare._nlist lists, PQ32) on the collection's own vectors: build s, bytes/reference,
    search ms/query, share of Flat's top-k returned, true source in the top k (no IVF-PQ rows without `nprobes`)."""
    from pair_vit.bench.compare import _nlist
    from pair_vit.match import index as ix

    s, index = detector.settings, detector.index
    stored = detector.store.vectors(index.ids, index.dim)
    ids = list(stored)
    vectors = np.concatenate([stored[i] for i in ids])
    owner = np.repeat(np.arange(len(ids)), [len(stored[i]) for i in ids])
    q_ids, q_vectors, q_owner = ix.embed_folder(detector.descriptor, queries, s.batch_size, s.amp, s.views)
    flat = search_rows(index, "Flat", None, 0.0, q_ids, q_vectors, q_owner, k, s, truth, None)
    rows, flat_top = [flat[0]], flat[1]
    if not nprobes:
        return rows
    factory = f"IVF{_nlist(len(vectors))},PQ32"
    try:
        start = time.perf_counter()
        ivf = ix.ReferenceIndex.build(ids, vectors, factory, view_owner=owner)
        build_s = time.perf_counter() - start
    except ValueError as err:  # too few vectors to train it
        return rows + [{"index": factory, "error": str(err)}]
    for probe in nprobes:
        ivf.nprobe = probe
        rows.append(search_rows(ivf, factory, probe, build_s, q_ids, q_vectors, q_owner, k, s, truth, flat_top)[0])
    return rows


def search_rows(index, name: str, nprobe, build_s: float, q_ids, q_vectors, q_owner, k: int, s, truth: dict,
                flat_top: set | None) -> tuple[dict[str, Any], set]:
    """One row of `ivf_against_flat` (and the (query, reference) pairs of its top-k shortlists)."""
    import faiss

    from pair_vit.match import index as ix

    start = time.perf_counter()
    top = ix.search_views(index, q_ids, q_vectors, q_owner, k, subview_penalty=s.subview_penalty,
                          reference_penalty=s.reference_penalty)
    search_ms = 1000 * (time.perf_counter() - start) / max(1, len(q_ids))
    pairs = set(zip(top.query_id, top.reference_id))
    flat_top = pairs if flat_top is None else flat_top
    return {"index": name, "nprobe": nprobe, "build_s": build_s,
            "bytes_per_reference": len(faiss.serialize_index(index.index)) / len(index),
            "search_ms_per_query": search_ms, f"share_of_flat_top{k}": len(pairs & flat_top) / max(1, len(flat_top)),
            f"true_source_in_top{k}": float(np.mean([(q, truth[q]) in pairs for q in q_ids]))}, pairs


def earlier_vectors(detector, n_rows: int) -> np.ndarray:
    """The first `n_rows` vectors of the collection's (Flat) faiss index, exactly as stored."""
    return detector.index.index.reconstruct_n(0, n_rows)


# ----------------------------------------------------------------------------- the run


def run(cfg: IndexBenchConfig) -> dict[str, Any]:
    """Build, save, load, time, extend and measure a collection (see the module docstring); write results."""
    from pair_vit.match import index as ix
    from pair_vit.match.detector import CopyDetector

    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    results: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine_at_start": machine()}
    photos = real_photos(cfg.images)
    images = fill_with_variants(photos, cfg.n_references + cfg.n_added, out / "variants")
    order = [list(images)[i] for i in np.random.default_rng(cfg.seed).permutation(len(images))]
    build, extra = order[:cfg.n_references], order[cfg.n_references:cfg.n_references + cfg.n_added]
    real_built = {i: images[i] for i in build if i in photos}
    truth = edited_queries(real_built, cfg.n_queries + cfg.recall_queries, out / "queries", cfg.seed)
    queries = sorted((out / "queries").glob("q*.jpg"))
    results["collection"] = {"real_photos": len(photos), "variants": len(images) - len(photos),
                             "built": len(build), "added": len(extra), "queries": len(queries)}

    index_dir = out / "collection"
    start = time.perf_counter()
    detector = CopyDetector(progress=cfg.progress)
    models_s = time.perf_counter() - start
    start = time.perf_counter()
    report = detector.add({i: images[i] for i in build})
    detector.save(index_dir, overwrite=True)
    build_s = time.perf_counter() - start
    del detector
    gc.collect()

    before = rss_bytes()
    start = time.perf_counter()
    detector = CopyDetector.load(index_dir)
    load_s = time.perf_counter() - start
    index_alone_rss = _index_rss(detector)
    n_refs, n_rows = len(detector), detector.index.n_rows
    results["build"] = {"references": n_refs, "skipped": len(report.skipped), "models_load_s": models_s,
                        "build_s": build_s, "s_per_reference": build_s / max(1, n_refs), "load_s": load_s,
                        "rss_after_load_bytes": rss_bytes(), "rss_before_load_bytes": before}

    timed = queries[:cfg.n_queries]
    results["one_query"] = {"fp32": time_queries(detector, timed, truth, amp=False),
                            "bf16_default": time_queries(detector, timed, truth, amp=True)}
    detector.settings.amp = True

    snapshot = earlier_vectors(detector, n_rows)
    start = time.perf_counter()
    added = detector.add({i: images[i] for i in extra})
    detector.save()
    add_s = time.perf_counter() - start
    reread = ix.ReferenceIndex.load(index_dir / detector.store.meta()["index_dir"])
    results["add"] = {"added": len(added.added), "add_s": add_s, "s_per_reference": add_s / max(1, len(added.added)),
                      "vs_build_per_reference": (add_s / max(1, len(added.added))) / (build_s / max(1, n_refs)),
                      "earlier_vectors_identical_in_memory": bool(np.array_equal(snapshot,
                                                                                 earlier_vectors(detector, n_rows))),
                      "earlier_vectors_identical_on_disk": bool(np.array_equal(snapshot,
                                                                               reread.index.reconstruct_n(0, n_rows)))}
    base = results["build"]["rss_after_load_bytes"] - index_alone_rss
    results["memory"] = memory_figures(detector, index_dir, index_alone_rss / max(1, n_refs), base)
    recall_set = {p.stem: p for p in queries[cfg.n_queries:] or queries}
    results["ivf_pq"] = ivf_against_flat(detector, recall_set, truth, cfg.k, cfg.nprobes)
    sizes = [int(n) for n in cfg.scaling_sizes if int(n) > 0]
    if sizes:
        from pair_vit.bench.compare import search_scaling

        results["search_scaling_random"] = search_scaling(sizes, 100).to_dict(orient="records")
    results["machine_at_end"] = machine()
    write_results(results, out)
    return results


def _index_rss(detector) -> int:
    """RAM the collection takes: RSS growth of loading its faiss index, ids and reference sources alone (another
    copy, then dropped), at least the size of the faiss index (an allocator may reuse freed memory)."""
    from pair_vit.match import index as ix
    from pair_vit.match.store import ReferenceStore

    gc.collect()
    before = rss_bytes()
    folder = detector.folder / detector.store.meta()["index_dir"]
    copies = (ix.ReferenceIndex.load(folder), ReferenceStore.open(detector.folder))
    grown = rss_bytes() - before
    copies[1].close()
    del copies
    gc.collect()
    return max(grown, sum(p.stat().st_size for p in folder.glob("*.faiss")))


def memory_figures(detector, index_dir: Path, ram_per_ref: float, base: int) -> dict[str, Any]:
    """Bytes per reference (saved faiss index, RAM, reference store on disk) and the Flat collection that fits in
    24 GiB of RAM beside `base`, what a loaded detector needs anyway (models, libraries)."""
    n = len(detector)
    faiss_bytes = sum(p.stat().st_size for p in (index_dir / detector.store.meta()["index_dir"]).glob("*.faiss"))
    return {"references": n, "faiss_index_bytes_per_reference": faiss_bytes / n,
            "ram_bytes_per_reference": ram_per_ref, "store_bytes_per_reference": detector.store.file_size() / n,
            "process_base_bytes": base,
            "flat_references_in_24_gib": int((24 * GIB - base) / max(ram_per_ref, 1.0))}


def write_results(results: dict[str, Any], out: Path) -> None:
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    md = [f"# CopyDetector benchmark\n\n`{results['command']}`\n", f"machine: {results['machine_at_start']}\n",
          f"collection: {results['collection']}\n", "## one query, end to end (s)\n",
          pd.DataFrame(results["one_query"]).T.to_markdown(floatfmt=".3f"), "\n## build, add\n",
          pd.DataFrame([results["build"]]).T.to_markdown(floatfmt=".3f"),
          pd.DataFrame([results["add"]]).T.to_markdown(floatfmt=".3f"), "\n## memory\n",
          pd.DataFrame([results["memory"]]).T.to_markdown(floatfmt=".0f"), "\n## IVF-PQ vs Flat (real vectors)\n",
          pd.DataFrame(results["ivf_pq"]).to_markdown(index=False, floatfmt=".3f")]
    if "search_scaling_random" in results:
        md += ["\n## faiss search vs size (random 256-d vectors)\n",
               pd.DataFrame(results["search_scaling_random"]).to_markdown(index=False, floatfmt=".3f")]
    text = "\n".join(md) + "\n"
    write_text_atomic(out / "results.md", text)
    print(text)
