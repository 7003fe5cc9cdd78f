"""scripts/benchmark_track.py: the descriptor track on a benchmark, a row per normalisation setting, cached vectors."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from pair_vit import demo_dir
from pair_vit.bench import make as benchmark
from pair_vit.bench import track as bench
from pair_vit.descriptor import normalise as norm
from pair_vit.descriptor import track as export


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("track") / "bench"
    benchmark.run(benchmark.BenchmarkConfig(images=str(Path(str(demo_dir())) / "clothing_cc0"), out=str(out),
                                            split="dev", n_references=10, n_queries=6, workers=1))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pair_vit.checkpoint import save_checkpoint
    from pair_vit.descriptor.model import build_descriptor

    torch.manual_seed(0)
    model = build_descriptor({"backbone": "resnet18", "embed_dim": 32, "image_size": 64, "gem_p": 3.0})
    path = tmp_path_factory.mktemp("ckpt") / "desc.pt"
    save_checkpoint(path, kind="descriptor", model=model, model_args=dict(model.model_args))
    return path


def test_a_row_per_setting_and_vectors_described_once(bench_dir, checkpoint, train_photos, tmp_path, monkeypatch):
    cfg = bench.TrackBenchConfig(benchmark=str(bench_dir), out=str(tmp_path), checkpoint=str(checkpoint),
                                 methods=["pdq", "descriptor"], train=str(train_photos), subtract_k=[1, 3],
                                 stretch_factor=[1.0, 2.0], progress=False, num_workers=0)
    table = bench.run(cfg, command="test")
    rows = list(zip(table.method, table.normalise, table.settings.fillna("")))
    assert rows[:2] == [("pdq", "none", ""), ("descriptor", "none", "")]
    assert [r[1] for r in rows[2:]] == ["subtract"] * 2 + ["stretch"] * 2 + ["subtract+stretch"] * 4
    assert rows[2][2] == "k=1 beta=0.35 alpha=0 iterations=1" and rows[4][2] == "n=3 factor=1"
    assert table.uAP.between(0, 1).all() and (table["n_train"][2:] == 12).all()
    assert len(pd.read_csv(tmp_path / "track.csv")) == 10 and "Descriptor track" in (tmp_path / "track.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 5  # queries, references x 2 methods, training photos
    # per edit family, recall@20/50 of each normalisation's first setting (a shortlist's depth, beyond the track's k)
    families = pd.read_csv(tmp_path / "track_families.csv")
    assert families.edit.iloc[0] == "all" and families.n.iloc[0] == 3  # the 3 copies among the 6 queries
    assert list(families.columns[2:5]) == ["none R@20", "none R@50", "subtract R@20"]
    assert (families["none R@20"] == 1.0).all()  # 10 references: every source is in the 20 nearest
    edits = pd.read_csv(bench_dir / "edits.csv").dropna(subset=["reference_id"])
    chains = {e for chain in edits.edits for e in chain.split(";")}
    assert set(families.edit[1:]) == chains

    def fail(*args, **kwargs):
        raise AssertionError("described again")

    monkeypatch.setattr(export, "describe", fail)
    again = bench.run(cfg, command="test")
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), table.drop(columns="seconds"))


def test_benchmark_sources_are_kept_out_of_the_training_descriptors(bench_dir):
    sources = norm.benchmark_sources(bench_dir)
    manifest = pd.read_csv(bench_dir / "manifest.csv")
    assert len(sources) == manifest.source.nunique() > 0
    photos = norm.training_images(Path(str(demo_dir())) / "clothing_cc0", "dev")
    assert sources <= set(photos) and not sources & set(norm.training_images(
        Path(str(demo_dir())) / "clothing_cc0", "dev", exclude=sources))


def test_unknown_method_is_refused(bench_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method or normalisation"):
        bench.run(bench.TrackBenchConfig(benchmark=str(bench_dir), out=str(tmp_path), methods=["sift"]))
