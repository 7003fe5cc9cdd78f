"""Benchmark of `pair-vit serve` over HTTP: the real server (`pair_vit.serve.process`) on a saved collection.

    python scripts/bench_serve.py --n-references 10000 --out runs/bench_serve

What it measures, on the CPU it runs on (recorded with the load average, which should be ~0):
  - one query over HTTP: POST /match with one edited copy of an indexed photo (`bench.library.edited_queries`),
    k=5, one request at a time: median and p95 latency over `n_queries`, and how often the source came first;
  - throughput with `clients` concurrent clients, each sending one query per request: queries per second and
    the median latency they saw;
  - batching: seconds per query when `clients` queries come in one request (one `CopyDetector.match` call)
    against one request each, the same queries;
  - server memory: resident (VmRSS) and peak (VmHWM) of the server process after the runs;
  - store bytes per reference: the saved reference store and faiss index on disk, divided by the references.

The collection is built in-process with `CopyDetector` (as bench_index.py builds it) in `out`/collection, or
extended to `n_references` if one is there, from real photos (`bench.library.real_photos`) filled up with mirrored and cropped variants.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pair_vit.bench.library import edited_queries, fill_with_variants, machine, real_photos
from pair_vit.config import opt, save_config
from pair_vit.io import write_text_atomic


@dataclass
class ServeBenchConfig:
    """Time `pair-vit serve` over HTTP: one-query latency, concurrent throughput, memory, store bytes."""

    images: list = opt([], "folders of real photos (default: ../shared/data/train and the package's demo photos)")
    n_references: int = opt(10000, "references in the served collection (variants of the photos fill up to it)")
    n_queries: int = opt(20, "edited copies matched one request at a time (median and p95 latency)")
    clients: int = opt(4, "concurrent clients for the throughput figure")
    throughput_queries: int = opt(40, "requests sent by the concurrent clients in all")
    k: int = opt(5, "rows per query asked of /match")
    out: str = opt("runs/bench_serve", "folder for the collection, the photos, results.json, results.md")
    seed: int = opt(0, "seed for the queried photos and their edits")
    server_args: list = opt([], "extra `pair-vit serve` options, e.g. --server-args=--token-recall=3 (per-match settings "
                                "override the collection's)")
    progress: bool = opt(True, "progress bars while building")


def build_collection(cfg: ServeBenchConfig, folder: Path) -> dict[str, Path]:
    """The references (id -> photo), saved as a collection in `folder` (extended if one is there already)."""
    from pair_vit.match.detector import CopyDetector
    from pair_vit.match.store import DB_FILE

    photos = dict(list(real_photos(cfg.images).items())[:cfg.n_references])
    photos = fill_with_variants(photos, cfg.n_references, Path(cfg.out) / "variants")
    exists = (folder / DB_FILE).exists()
    detector = CopyDetector.load(folder, progress=cfg.progress) if exists else CopyDetector(progress=cfg.progress)
    if detector.add(photos).added:  # a rerun with more references embeds only the new ones
        detector.save(folder)
    return photos


def post_match(http, path: Path, k: int) -> tuple[float, dict]:
    """(seconds, answer) of one POST /match with one image."""
    start = time.perf_counter()
    response = http.post("/match", data={"k": str(k)}, files=[("image", (path.name, path.read_bytes()))])
    response.raise_for_status()
    return time.perf_counter() - start, response.json()


def latency(url: str, queries: list[Path], truth: dict[str, str], k: int) -> dict[str, float]:
    """One request at a time: median and p95 seconds, share of queries whose source came first."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        post_match(http, queries[0], k)  # warm-up: first-call allocations, page cache
        times, first = [], 0
        for path in queries:
            seconds, found = post_match(http, path, k)
            times.append(seconds)
            first += bool(found["matches"]) and found["matches"][0]["reference_id"] == truth[path.stem]
    return {"median_s": statistics.median(times), "p95_s": float(np.percentile(times, 95)),
            "source_first": first / len(queries), "n": len(queries)}


def throughput(url: str, queries: list[Path], clients: int, total: int, k: int) -> dict[str, float]:
    """`clients` threads sending `total` single-image requests between them: queries per second."""
    import httpx

    paths = [queries[i % len(queries)] for i in range(total)]

    def client(part: list[Path]) -> list[float]:
        with httpx.Client(base_url=url, timeout=600) as http:
            return [post_match(http, p, k)[0] for p in part]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seen = [s for part in pool.map(client, [paths[c::clients] for c in range(clients)]) for s in part]
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": total, "queries_per_s": total / elapsed,
            "median_latency_s": statistics.median(seen)}


def batching(url: str, queries: list[Path], size: int, k: int) -> dict[str, float]:
    """Seconds per query when `size` queries come in one request (one `CopyDetector.match` call) against one
    request each: whether batching concurrent requests together would pay."""
    import httpx

    groups = [queries[i:i + size] for i in range(0, len(queries) - size + 1, size)]
    with httpx.Client(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        for group in groups:
            files = [("image", (p.name, p.read_bytes())) for p in group]
            http.post("/match", data={"k": str(k)}, files=files).raise_for_status()
        batched = (time.perf_counter() - start) / (len(groups) * size)
        start = time.perf_counter()
        for path in [p for group in groups for p in group]:
            post_match(http, path, k)
        single = (time.perf_counter() - start) / (len(groups) * size)
    return {"batch": size, "batched_s_per_query": batched, "single_s_per_query": single}


def server_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, in bytes (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[key].split()[0]) * 1024 for name, key in (("rss", "VmRSS"), ("peak_rss", "VmHWM"))}


def store_bytes(folder: Path, n: int) -> dict[str, Any]:
    """Bytes on disk per reference: the SQLite store, the faiss index, and the store's columns (what each part
    costs: descriptor vectors, pair-ViT tokens, thumbnail, SIFT keypoints)."""
    import sqlite3

    from pair_vit.match.store import DB_FILE

    store = (folder / DB_FILE).stat().st_size
    index = sum(p.stat().st_size for p in folder.glob("index-*/*") if p.is_file())
    with sqlite3.connect(folder / DB_FILE) as conn:
        row = conn.execute("SELECT sum(length(vectors)), sum(length(pair)), sum(length(thumbnail)), "
                           "sum(length(xy) + length(descriptors)) FROM refs").fetchone()
    columns = dict(zip(("vectors", "pair_tokens", "thumbnail", "sift_keypoints"), (v / n for v in row)))
    return {"store_bytes": store, "index_bytes": index, "store_bytes_per_reference": store / n,
            "index_bytes_per_reference": index / n, "column_bytes_per_reference": columns}


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    from pair_vit.serve.process import ServerProcess

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    folder = out / "collection"
    start = time.perf_counter()
    photos = build_collection(cfg, folder)
    built_s = time.perf_counter() - start
    truth = edited_queries(photos, cfg.n_queries, out / "queries", cfg.seed)
    queries = [out / "queries" / f"{q}.jpg" for q in sorted(truth)]
    with ServerProcess(folder, ["--log-level", "warning", "--no-progress", *cfg.server_args],
                       log=out / "server.log") as server:
        results = {"references": len(photos), "build_s": built_s, "machine": machine(), "server_args": cfg.server_args,
                   "latency": latency(server.url, queries, truth, cfg.k),
                   "throughput": throughput(server.url, queries, cfg.clients, cfg.throughput_queries, cfg.k),
                   "batching": batching(server.url, queries, cfg.clients, cfg.k),
                   "server_memory": server_memory(server.process.pid), **store_bytes(folder, len(photos))}
    results["machine"]["load_average_after"] = list(os.getloadavg())
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    write_text_atomic(out / "results.md", report(results))
    print(report(results))
    return results


def report(r: dict[str, Any]) -> str:
    mib = 1024 ** 2
    lat, tp, mem = r["latency"], r["throughput"], r["server_memory"]
    return "\n".join([
        f"pair-vit serve {' '.join(r.get('server_args', []))}".rstrip() + f", {r['references']} references; "
        f"{r['machine']['cpu']} ({r['machine']['cores']} cores, "
        f"native bf16: {r['machine']['native_bf16']}), load average before {r['machine']['load_average']}, "
        f"after {r['machine']['load_average_after']}",
        "", "| figure | value |", "|---|---|",
        f"| one query over HTTP, median | {lat['median_s']:.3f} s |",
        f"| one query over HTTP, p95 | {lat['p95_s']:.3f} s |",
        f"| source ranked first | {lat['source_first']:.2f} of {lat['n']} edited copies |",
        f"| throughput, {tp['clients']} concurrent clients | {tp['queries_per_s']:.2f} queries/s "
        f"(median latency {tp['median_latency_s']:.3f} s) |",
        f"| {r['batching']['batch']} queries in one request / one request each | "
        f"{r['batching']['batched_s_per_query']:.3f} / {r['batching']['single_s_per_query']:.3f} s per query |",
        f"| server memory, resident / peak | {mem['rss'] / mib:.0f} / {mem['peak_rss'] / mib:.0f} MiB |",
        f"| store bytes per reference (SQLite) | {r['store_bytes_per_reference'] / 1024:.1f} KB |",
        *(f"| - of which {name.replace('_', ' ')} | {value / 1024:.1f} KB |"
          for name, value in r["column_bytes_per_reference"].items()),
        f"| faiss index bytes per reference | {r['index_bytes_per_reference'] / 1024:.1f} KB |", ""])
