"""scripts/benchmark.py: every matcher on one benchmark, tables written, search-scaling rows."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pair_vit.bench import make as benchmark, compare
from pair_vit import demo_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "bench"
    benchmark.run(benchmark.BenchmarkConfig(images=str(demo_dir()), out=str(out), split="all",
                                            n_references=12, n_queries=8, workers=1))
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


@pytest.fixture(scope="module")
def pair_checkpoint(tmp_path_factory):
    from pair_vit.pair.model import build_pair_model, default_model_args, save_pair_model

    torch.manual_seed(0)
    model = build_pair_model(default_model_args(input_size=[32, 64],
                                                backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}))
    path = tmp_path_factory.mktemp("pair") / "pair.pt"
    save_pair_model(path, model, config={}, step=0, extra={"calibration": {"w_logit": 1.0, "w_desc": 5.0}})
    return path


def test_every_matcher_gets_a_row(bench, checkpoint, pair_checkpoint, tmp_path):
    cfg = compare.CompareConfig(benchmark=str(bench), out=str(tmp_path), descriptor_checkpoint=str(checkpoint),
                                views=["full", "halves"], background=str(Path(str(demo_dir())) / "skimage"),
                                background_split="all", k=5, scaling_sizes=[0], pair_checkpoint=str(pair_checkpoint),
                                pair_views=["full", "center"], rerank_k=3)
    table = compare.run(cfg, command="test")
    variants = set(zip(table.method, table.variant))
    assert {("pdq", ""), ("phash", ""), ("sift", ""), ("descriptor", "full"), ("descriptor", "full+norm"),
            ("descriptor", "halves"), ("descriptor", "halves+norm"), ("rerank", "full"), ("rerank", "full +fused"),
            ("rerank", "full+center"), ("rerank", "full+center +fused")} <= variants
    assert {("rerank", "full +fused +verified (cross-fit)"), ("rerank", "full+center +fused +verified (cross-fit)"),
            ("rerank", "no pair ViT: descriptor +verified (cross-fit)")} <= variants
    assert {m for m, _ in variants} == {"pdq", "phash", "sift", "descriptor", "rerank"}
    assert (tmp_path / "pr_rerank_full+center_fused.png").is_file()
    assert (tmp_path / "rerank_full.csv").is_file() and (table["s/query"] > 0).all()
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


def test_view_sets_and_artefact_names():
    assert compare.view_sets(["full", "center", "halves"]) == [
        ("full", ["full"]), ("full+center", ["full", "center"]),
        ("full+halves", ["full", "left", "right", "top", "bottom"]),
        ("all views", ["full", "center", "left", "right", "top", "bottom"])]
    assert compare.view_sets(["full", "hflip"]) == [("full", ["full"]), ("full+hflip", ["full", "hflip"])]
    assert compare.artefact_name("rerank", "full+center +fused (cross-fit)") == "rerank_full+center_fused_cross-fit"
    assert compare.artefact_name("pdq", "") == "pdq"


def test_smoke_ranks_real_pairs_among_distractors(checkpoint, pair_checkpoint, tmp_path):
    import shutil

    from pair_vit import data

    photos = sorted(data.list_images(demo_dir() / "skimage").values())
    smoke = tmp_path / "smoke"
    (smoke / "a").mkdir(parents=True)
    (smoke / "b").mkdir()
    shutil.copy(photos[0], smoke / "a" / "Q1.jpg")
    shutil.copy(photos[0], smoke / "a" / "R1.jpg")
    (smoke / "a" / "ground_truth.csv").write_text("query_id,reference_id\nQ1,R1\n")
    shutil.copy(photos[1], smoke / "b" / "x_original.jpg")
    shutil.copy(photos[1], smoke / "b" / "x_modified.jpg")
    cfg = compare.CompareConfig(smoke=str(smoke), smoke_distractors=str(demo_dir() / "clothing_cc0"), smoke_max=6,
                                descriptor_checkpoint=str(checkpoint), pair_checkpoint=str(pair_checkpoint),
                                pair_views=["full"], rerank_k=5)
    table = compare.smoke_ranks(cfg)
    assert list(table.pair) == ["a", "b"]
    assert (table["descriptor rank"] == 1).all()  # exact copies: the descriptor puts them first
    assert table["reranked rank"].between(1, 5).all() and table["reranked score"].between(0, 1).all()
    assert (table.references == 6 + 2).all()  # the distractors and both pairs' references, embedded once
    shutil.copy(photos[2], smoke / "b" / "R1.jpg")  # folder b now holds a second image with id R1
    (smoke / "b" / "ground_truth.csv").write_text("query_id,reference_id\nx_modified,R1\n")
    with pytest.raises(ValueError, match="share the id 'R1'"):
        compare.smoke_ranks(cfg)
