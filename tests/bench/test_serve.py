"""The serve benchmark's measurements that need no server: memory of a process, bytes on disk, the report."""
from __future__ import annotations

import os

from pair_vit.bench import serve


def test_server_memory_reads_this_process():
    memory = serve.server_memory(os.getpid())
    assert 10 * 2 ** 20 < memory["rss"] <= memory["peak_rss"]


def test_store_bytes_and_report(tmp_path):
    (tmp_path / "references.sqlite").write_bytes(b"x" * 4000)
    (tmp_path / "index-abc").mkdir()
    (tmp_path / "index-abc" / "index.0.faiss").write_bytes(b"x" * 1000)
    sizes = serve.store_bytes(tmp_path, 2)
    assert sizes == {"store_bytes": 4000, "index_bytes": 1000, "store_bytes_per_reference": 2000.0,
                     "index_bytes_per_reference": 500.0}
    results = {"references": 2, **sizes, "machine": {"cpu": "Xeon", "cores": 2, "native_bf16": True,
                                                      "load_average": [0, 0, 0], "load_average_after": [0, 0, 0]},
               "latency": {"median_s": 0.25, "p95_s": 0.5, "source_first": 1.0, "n": 20},
               "throughput": {"clients": 4, "requests": 40, "queries_per_s": 3.5, "median_latency_s": 1.1},
               "batching": {"batch": 4, "batched_s_per_query": 0.2, "single_s_per_query": 0.25},
               "server_memory": {"rss": 2 ** 30, "peak_rss": 2 ** 31}}
    text = serve.report(results)
    for figure in ("| one query over HTTP, median | 0.250 s |", "| one query over HTTP, p95 | 0.500 s |",
                   "3.50 queries/s", "1024 / 2048 MiB", "| store bytes per reference (SQLite) | 2.0 KB |"):
        assert figure in text
