"""The serve benchmark's measurements that need no server: memory of a process, bytes on disk, the report."""
from __future__ import annotations

import os

import numpy as np

from pair_vit.bench import serve
from pair_vit.match.store import ReferenceStore, StoredReference


def test_server_memory_reads_this_process():
    memory = serve.server_memory(os.getpid())
    assert 10 * 2 ** 20 < memory["rss"] <= memory["peak_rss"]


def test_store_bytes_and_report(tmp_path):
    refs = [StoredReference(f"r{i}", "x.jpg", np.zeros((3, 256), np.float32), np.zeros((112, 10, 10), np.float16),
                            b"j" * 5000, np.zeros((n, 2), np.float32), np.zeros((n, 128), np.float16))
            for i, n in enumerate((100, 300))]  # 3 KB of vectors, 22.4 KB of tokens, 5 KB, 264 bytes a keypoint
    store = ReferenceStore()
    store.put(refs)
    store.save(tmp_path, {"index_dir": "index-abc"})
    (tmp_path / "index-abc").mkdir()
    (tmp_path / "index-abc" / "index.0.faiss").write_bytes(b"x" * 1000)
    sizes = serve.store_bytes(tmp_path, 2)
    db = (tmp_path / "references.sqlite").stat().st_size
    assert sizes["store_bytes"] == db and sizes["store_bytes_per_reference"] == db / 2
    assert sizes["index_bytes"] == 1000 and sizes["index_bytes_per_reference"] == 500.0
    assert sizes["column_bytes_per_reference"] == {"vectors": 3072, "pair_tokens": 22400, "thumbnail": 5000,
                                                   "sift_keypoints": 200 * 264}
    results = {"references": 2, **sizes, "machine": {"cpu": "Xeon", "cores": 2, "native_bf16": True,
                                                      "load_average": [0, 0, 0], "load_average_after": [0, 0, 0]},
               "latency": {"median_s": 0.25, "p95_s": 0.5, "source_first": 1.0, "n": 20},
               "throughput": {"clients": 4, "requests": 40, "queries_per_s": 3.5, "median_latency_s": 1.1},
               "batching": {"batch": 4, "batched_s_per_query": 0.2, "single_s_per_query": 0.25},
               "server_memory": {"rss": 2 ** 30, "peak_rss": 2 ** 31}}
    text = serve.report(results)
    for figure in ("| one query over HTTP, median | 0.250 s |", "| one query over HTTP, p95 | 0.500 s |",
                   "3.50 queries/s", "1024 / 2048 MiB", f"| store bytes per reference (SQLite) | {db / 2 / 1024:.1f} KB |",
                   "| - of which pair tokens | 21.9 KB |", "| - of which sift keypoints | 51.6 KB |"):
        assert figure in text
