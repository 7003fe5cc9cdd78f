"""Benchmark builder: layout, roles, determinism, split discipline, bad photos."""
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pair_vit.bench import make as benchmark
from pair_vit import data, demo_dir

DEMO = Path(str(demo_dir()))
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_benchmark.py"


def small_config(out, **overrides):
    values = dict(images=str(DEMO), out=str(out), split="all", n_references=20, n_queries=12,
                  positive_fraction=0.5, workers=1, seed=0)
    values.update(overrides)
    return benchmark.BenchmarkConfig(**values)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b"
    benchmark.run(small_config(out))
    return out


def test_layout(built):
    layout = data.DiscLayout.from_root(built)
    refs, queries = layout.reference_images(), layout.query_images()
    assert len(refs) == 20 and len(queries) == 12
    assert all(r.startswith("R") and len(r) == 7 for r in refs)
    assert all(q.startswith("Q") and len(q) == 7 for q in queries)
    gt = layout.load_ground_truth()
    assert len(gt) == 6 and set(gt.reference_id) <= set(refs) and set(gt.query_id) <= set(queries)
    assert gt.reference_id.is_unique  # each positive has its own reference
    assert (built / "config.yaml").is_file() and not (built.parent / "b.partial").exists()


def test_edits_table(built):
    edits = pd.read_csv(built / "edits.csv", dtype=str, keep_default_na=False)
    assert list(edits.columns) == ["query_id", "reference_id", "edits", "intensity"]
    assert len(edits) == 12 and (edits.edits != "").all()
    assert (edits.reference_id == "").sum() == 6


def test_distractors_are_not_references(built):
    manifest = pd.read_csv(built / "manifest.csv", dtype=str, keep_default_na=False)
    gt = data.read_ground_truth(built / "ground_truth.csv")
    sources = dict(zip(manifest.id, manifest.source))
    ref_sources = {sources[i] for i in manifest.id if i.startswith("R")}
    distractors = set(manifest.id[manifest.role == "query"]) - set(gt.query_id)
    assert distractors and not {sources[q] for q in distractors} & ref_sources
    for q, r in zip(gt.query_id, gt.reference_id):
        assert sources[q] == sources[r]


def test_references_are_byte_copies(built):
    manifest = pd.read_csv(built / "manifest.csv", dtype=str)
    row = manifest[manifest.role == "reference"].iloc[0]
    assert (built / "references" / f"{row.id}.jpg").read_bytes() == (DEMO / row.source).read_bytes()


def test_deterministic(built, tmp_path):
    again = tmp_path / "again"
    benchmark.run(small_config(again, workers=2))
    for name in ("ground_truth.csv", "edits.csv", "manifest.csv"):
        assert (again / name).read_text() == (built / name).read_text()
    q = sorted((built / "queries").iterdir())[0].name
    assert (again / "queries" / q).read_bytes() == (built / "queries" / q).read_bytes()


def test_refuses_existing_output(built):
    with pytest.raises(FileExistsError, match="overwrite"):
        benchmark.run(small_config(built))


def test_dev_split_only_uses_dev_photos(tmp_path):
    out = tmp_path / "dev"
    benchmark.run(small_config(out, split="dev", n_references=10, n_queries=6))
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    stems = {Path(s).stem for s in manifest.source}
    assert stems and all(data.split_of(s) == "dev" for s in stems)


def test_too_few_photos_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="usable photos"):
        benchmark.run(small_config(tmp_path / "x", n_references=400, n_queries=200))


def test_corrupt_photos_are_skipped_and_reported(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for p in sorted(DEMO.glob("clothing_cc0/*.jpg"))[:30]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    cut = sorted(src.glob("*.jpg"))[0]
    cut.write_bytes(cut.read_bytes()[:2000])
    out = tmp_path / "b"
    benchmark.run(small_config(out, images=str(src), n_references=20, n_queries=12))
    skipped = pd.read_csv(out / "skipped.csv")
    assert {"broken.jpg", cut.name} == {Path(p).name for p in skipped.path}
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert not {"broken.jpg", cut.name} & {Path(s).name for s in manifest.source}


def test_script(tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, str(SCRIPT), "--images", str(DEMO), "--out", str(out), "--split", "all",
            "--n-references", "8", "--n-queries", "4", "--workers", "1"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "4 queries" in done.stdout and len(list((out / "queries").iterdir())) == 4
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
