"""scripts/benchmark.py: every matcher on one benchmark, tables written, search-scaling rows."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pair_vit import benchmark, compare, demo_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "bench"
    benchmark.run(benchmark.BenchmarkConfig(images=str(demo_dir()), out=str(out), split="all",
                                            n_references=12, n_queries=8, workers=1))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pair_vit.checkpoint import save_checkpoint
    from pair_vit.descriptor import build_descriptor

    torch.manual_seed(0)
    model = build_descriptor({"backbone": "resnet18", "embed_dim": 32, "image_size": 64, "gem_p": 3.0})
    path = tmp_path_factory.mktemp("ckpt") / "desc.pt"
    save_checkpoint(path, kind="descriptor", model=model, model_args=dict(model.model_args))
    return path


def test_every_matcher_gets_a_row(bench, checkpoint, tmp_path):
    cfg = compare.CompareConfig(benchmark=str(bench), out=str(tmp_path), descriptor_checkpoint=str(checkpoint),
                                views=["full", "halves"], background=str(Path(str(demo_dir())) / "skimage"),
                                background_split="all", k=5, scaling_sizes=[0])
    table = compare.run(cfg, command="test")
    variants = set(zip(table.method, table.variant))
    assert {("pdq", ""), ("phash", ""), ("sift", ""), ("descriptor", "full"), ("descriptor", "full+norm"),
            ("descriptor", "halves"), ("descriptor", "halves+norm")} == variants
    assert table["uAP"].between(0, 1).all() and (table["R@5"] >= table["R@1"]).all()
    assert (table["time vs pdq"] > 0).all()
    saved = pd.read_csv(tmp_path / "results.csv")
    assert len(saved) == len(table) and "uAP" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "search_scaling.csv").exists()


def test_search_scaling_flat_and_ivf():
    table = compare.search_scaling([300, 10000], n_queries=20)
    assert list(table["index"]) == ["Flat", "Flat", "IVF400,PQ32"]
    assert (table["ms/query"] > 0).all()


def test_script_requires_a_benchmark():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py")], capture_output=True, text=True)
    assert done.returncode == 2 and "--benchmark" in done.stderr
