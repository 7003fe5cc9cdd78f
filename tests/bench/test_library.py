"""scripts/bench_index.py (pair_vit/bench/library.py) on a dozen demo photos: every figure is produced."""
from __future__ import annotations

import json

import pytest

from pair_vit.bench import library


def test_index_benchmark_runs_small(train_photos, tmp_path):
    cfg = library.IndexBenchConfig(images=[str(train_photos)], n_references=11, n_added=3, n_queries=1,
                                   recall_queries=1, nprobes=[], scaling_sizes=[0], out=str(tmp_path / "out"),
                                   progress=False)
    results = library.run(cfg)
    assert results["collection"] == {"real_photos": 12, "variants": 2, "built": 11, "added": 3, "queries": 2}
    assert results["build"]["references"] == 11 and results["add"]["added"] == 3
    assert results["add"]["earlier_vectors_identical_in_memory"] and results["add"]["earlier_vectors_identical_on_disk"]
    for precision in ("fp32", "bf16_default"):
        assert 0 < results["one_query"][precision]["median_s"] < 60
    memory = results["memory"]
    assert memory["faiss_index_bytes_per_reference"] == pytest.approx(5 * 256 * 4, rel=0.05)  # 5 views, float32
    assert memory["ram_bytes_per_reference"] >= memory["faiss_index_bytes_per_reference"] * 0.9
    assert memory["flat_references_in_24_gib"] > 1_000_000
    assert [row["index"] for row in results["ivf_pq"]] == ["Flat"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["add"]["added"] == 3
    assert "one query, end to end" in (tmp_path / "out" / "results.md").read_text()
