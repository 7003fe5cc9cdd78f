"""scripts/rerank.py: the stage-1 shortlist (--descriptor-only) and the pair-ViT reranking, written as a submission."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pair_vit
from pair_vit import data
from pair_vit.match import index as ix
from pair_vit.match import rerank
from pair_vit.descriptor.model import load_descriptor

ROOT = Path(__file__).resolve().parents[2]
SMALL_ARGS = {"backbone": "resnet18", "embed_dim": 32, "image_size": 64, "gem_p": 3.0}


def save_descriptor(model, path: Path) -> Path:
    from pair_vit.checkpoint import save_checkpoint

    save_checkpoint(path, kind="descriptor", model=model, model_args=dict(model.model_args))
    return path


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    from pair_vit.descriptor.model import build_descriptor

    torch.manual_seed(seed)
    return save_descriptor(build_descriptor({**SMALL_ARGS, **overrides}), path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "desc.pt")


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path, list[str]]:
    """6 demo references; queries: exact copies of 2 of them under new ids, plus one unreadable file."""
    photos = sorted(data.list_images(pair_vit.demo_dir() / "clothing_cc0").values())[:6]
    refs, queries = tmp_path / "refs", tmp_path / "queries"
    refs.mkdir()
    queries.mkdir()
    for p in photos:
        shutil.copy(p, refs / p.name)
    shutil.copy(photos[1], queries / "Q1.jpg")
    shutil.copy(photos[4], queries / "Q4.jpg")
    (queries / "Qbad.jpg").write_bytes(b"not an image at all")
    return queries, refs, [photos[1].stem, photos[4].stem]


def config(queries, refs, out, descriptor, **kw) -> rerank.RerankConfig:
    base = dict(queries=str(queries), references=str(refs), output=str(out), descriptor_only=True, k=3,
                descriptor_checkpoint=str(descriptor), num_workers=0, progress=False)
    return rerank.RerankConfig(**{**base, **kw})


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "rerank.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def test_descriptor_only_end_to_end_script(folders, checkpoint, tmp_path):
    queries, refs, originals = folders
    out = tmp_path / "sub.csv"
    proc = run_script("--queries", str(queries), "--references", str(refs), "--output", str(out),
                      "--descriptor-only", "--k", "4", "--max-per-query", "3", "--descriptor-checkpoint",
                      str(checkpoint), "--views", "halves", "--batch-size", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    sub = pd.read_csv(out, dtype={"query_id": str, "reference_id": str})
    assert list(sub.columns) == ["query_id", "reference_id", "score"]
    assert sub.groupby("query_id").size().to_dict() == {"Q1": 3, "Q4": 3}  # none for the unreadable query
    top = sub.groupby("query_id").head(1).set_index("query_id")
    assert list(top.reference_id) == originals and (top.score > 0.995).all()
    skipped = pd.read_csv(f"{out}.skipped.csv")
    assert [Path(p).name for p in skipped.path] == ["Qbad.jpg"]
    assert "3 queries, 6 references, 1 unreadable skipped, 6 rows" in proc.stdout and "s wall" in proc.stdout
    assert (tmp_path / "sub.csv.config.yaml").is_file()
    # an existing output is kept unless --overwrite
    again = run_script("--queries", str(queries), "--references", str(refs), "--output", str(out),
                       "--descriptor-only", "--descriptor-checkpoint", str(checkpoint))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_descriptor_only_margin(folders, checkpoint, tmp_path):
    from pair_vit.match.calibration import similarity_margin

    queries, refs, _ = folders
    plain = rerank.run(config(queries, refs, tmp_path / "a.csv", checkpoint))
    margin = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, margin=True))
    assert list(margin.reference_id) == list(plain.reference_id)  # same shortlist and order within a query
    expected = plain.score + similarity_margin(plain.query_id.to_numpy(), plain.score.to_numpy())
    np.testing.assert_allclose(margin.score, expected, atol=1e-6)


def test_overwrite_refused_then_allowed(folders, checkpoint, tmp_path):
    queries, refs, _ = folders
    out = tmp_path / "sub.csv"
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        rerank.run(config(queries, refs, out, checkpoint))
    assert out.read_text() == "keep me"
    sub = rerank.run(config(queries, refs, out, checkpoint, overwrite=True))
    assert len(sub) == 6 and out.read_text().startswith("query_id,reference_id,score")


def test_empty_query_folder_gives_header_only_submission(folders, checkpoint, tmp_path, caplog):
    _, refs, _ = folders
    empty = tmp_path / "no_queries"
    empty.mkdir()
    out = tmp_path / "sub.csv"
    sub = rerank.run(config(empty, refs, out, checkpoint))
    assert len(sub) == 0 and out.read_text().strip() == "query_id,reference_id,score"
    assert "no query images" in caplog.text


def test_empty_reference_folder_is_an_error(folders, checkpoint, tmp_path):
    queries, _, _ = folders
    (tmp_path / "no_refs").mkdir()
    with pytest.raises(ValueError, match="no reference images"):
        rerank.run(config(queries, tmp_path / "no_refs", tmp_path / "sub.csv", checkpoint))


def test_missing_shipped_weights_are_named(folders, checkpoint, tmp_path, monkeypatch):
    queries, refs, _ = folders
    monkeypatch.setattr(rerank, "SHIPPED_WEIGHTS", tmp_path / "weights" / "pair_vit.pt")
    with pytest.raises(FileNotFoundError, match="pair-ViT.*train_pairs.py"):
        rerank.run(config(queries, refs, tmp_path / "s.csv", checkpoint, descriptor_only=False))
    monkeypatch.setattr(rerank, "DEFAULT_CHECKPOINT", tmp_path / "weights" / "descriptor.pt")
    with pytest.raises(FileNotFoundError, match="descriptor.*train_descriptor.py"):
        rerank.run(config(queries, refs, tmp_path / "s.csv", ""))


def test_saved_index_is_reused_extended_and_refused_for_another_model(folders, checkpoint, tmp_path, caplog):
    caplog.set_level("INFO", logger="pair_vit.match.rerank")
    queries, refs, originals = folders
    index_dir = tmp_path / "ref_index"
    first = rerank.run(config(queries, refs, tmp_path / "a.csv", checkpoint, index=str(index_dir)))
    meta = ix.ReferenceIndex.read_metadata(index_dir)
    assert meta["n_references"] == 6 and meta["n"] == 6 * 5 and meta["reference_views"] == "halves"
    extra = sorted(data.list_images(pair_vit.demo_dir() / "clothing_cc0").values())[10]
    shutil.copy(extra, refs / extra.name)
    shutil.copy(extra, queries / "Qextra.jpg")
    second = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, index=str(index_dir)))
    meta = ix.ReferenceIndex.read_metadata(index_dir)
    assert meta["n_references"] == 7 and meta["model_args"]["embed_dim"] == 32
    assert "(7 references, 1 new)" in caplog.text  # only the new reference was embedded
    assert second[second.query_id == "Qextra"].reference_id.iloc[0] == extra.stem
    for sub in (first, second[second.query_id != "Qextra"]):
        assert list(sub.groupby("query_id").head(1).reference_id) == originals
    other = make_checkpoint(tmp_path / "other.pt", embed_dim=16)
    with pytest.raises(ix.IndexMismatchError, match="16"):
        rerank.run(config(queries, refs, tmp_path / "c.csv", other, index=str(index_dir)))
    retrained = make_checkpoint(tmp_path / "retrained.pt", seed=1)
    with pytest.raises(ix.IndexMismatchError, match="other descriptor weights"):
        rerank.run(config(queries, refs, tmp_path / "c.csv", retrained, index=str(index_dir)))
    with pytest.raises(ix.IndexMismatchError, match="reference views 'halves', not the 'full'"):
        rerank.run(config(queries, refs, tmp_path / "c.csv", checkpoint, index=str(index_dir),
                          reference_views="full"))


def test_cached_index_in_the_work_folder_is_rebuilt_for_new_weights(folders, checkpoint, tmp_path, caplog):
    # Unlike an --index the user names, the work folder's index is a cache: new weights must not strand it.
    queries, refs, _ = folders
    work = tmp_path / "work"
    rerank.run(config(queries, refs, tmp_path / "a.csv", checkpoint, work_dir=str(work)))
    retrained = make_checkpoint(tmp_path / "retrained.pt", seed=1)
    caplog.set_level("WARNING", logger="pair_vit.match.rerank")
    sub = rerank.run(config(queries, refs, tmp_path / "b.csv", retrained, work_dir=str(work)))
    assert "rebuilding the cached reference index" in caplog.text and "other descriptor weights" in caplog.text
    meta = ix.ReferenceIndex.read_metadata(work / "ref_index")
    assert meta["fingerprint"] == ix.model_fingerprint(load_descriptor(retrained)[0])
    assert meta["n_references"] == 6 and sorted(sub.query_id.unique()) == ["Q1", "Q4"]


def test_background_normalisation_and_max_per_query(folders, checkpoint, tmp_path):
    queries, refs, originals = folders
    background = tmp_path / "background"
    background.mkdir()
    for p in sorted(data.list_images(pair_vit.demo_dir() / "clothing_cc0").values())[20:26]:
        shutil.copy(p, background / p.name)
    plain = rerank.run(config(queries, refs, tmp_path / "a.csv", checkpoint, max_per_query=2))
    normed = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, max_per_query=2,
                               background=str(background), background_n=2))
    assert plain.groupby("query_id").size().max() == 2
    assert (normed.score.to_numpy() < plain.score.to_numpy()).all()  # background similarity subtracted
    assert list(normed.groupby("query_id").head(1).reference_id) == originals



# ----------------------------------------------------------------------------- pair-ViT reranking

PAIR_ARGS = dict(input_size=[32, 64], backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
CALIBRATION = {"w_logit": 2.0, "w_desc": 1.0, "bias": -1.0}


@pytest.fixture(scope="module")
def pair_checkpoint(tmp_path_factory) -> Path:
    from pair_vit.pair.model import build_pair_model, default_model_args, save_pair_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pair") / "pair.pt"
    save_pair_model(path, build_pair_model(default_model_args(**PAIR_ARGS)), config={}, step=0,
                    extra={"calibration": CALIBRATION})
    return path


def pair_config(queries, refs, out, checkpoint, pair_checkpoint, **kw) -> rerank.RerankConfig:
    return config(queries, refs, out, checkpoint, descriptor_only=False, checkpoint=str(pair_checkpoint), **kw)


def read_chunks(work: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p, dtype={"query_id": str, "reference_id": str})
                      for p in sorted((work / "pairs").glob("chunk_*.csv"))], ignore_index=True)


def test_rerank_scores_every_candidate_with_the_stored_calibration(folders, checkpoint, pair_checkpoint, tmp_path,
                                                                   capsys):
    from pair_vit.match.calibration import Calibration

    queries, refs, _ = folders
    out = tmp_path / "sub.csv"
    sub = rerank.run(pair_config(queries, refs, out, checkpoint, pair_checkpoint, pair_views=["full", "rot180"]))
    assert sub.groupby("query_id").size().to_dict() == {"Q1": 3, "Q4": 3}
    raw = read_chunks(tmp_path / "sub.csv.work")
    assert {"logit_full", "logit_rot180", "logit"} <= set(raw.columns) and len(raw) == 6
    np.testing.assert_allclose(raw.logit, raw[["logit_full", "logit_rot180"]].max(axis=1))
    expected = raw.assign(score=Calibration(**CALIBRATION).apply(raw.logit, raw.score))
    merged = sub.merge(expected, on=["query_id", "reference_id"], suffixes=("", "_expected"))
    np.testing.assert_allclose(merged.score, merged.score_expected, rtol=1e-5)
    assert "12 pairs scored" in capsys.readouterr().out
    plain = rerank.run(pair_config(queries, refs, tmp_path / "plain.csv", checkpoint, pair_checkpoint,
                                   pair_views=["full", "rot180"], calibration="none"))
    merged = plain.merge(raw, on=["query_id", "reference_id"], suffixes=("", "_raw"))
    np.testing.assert_allclose(merged.score, 1 / (1 + np.exp(-merged.logit)), rtol=1e-5)
    found = rerank.match(pair_config(queries, refs, tmp_path / "plain.csv", checkpoint, pair_checkpoint,
                                     pair_views=["full", "rot180"], calibration="none"))
    assert found.calibration == Calibration() and found.stored_calibration == Calibration(**CALIBRATION)


def test_killed_rerank_resumes_without_redoing_work(folders, checkpoint, pair_checkpoint, tmp_path, monkeypatch,
                                                    drop_chunk):
    from pair_vit.pair import scoring as pair_scoring

    queries, refs, _ = folders
    cfg = pair_config(queries, refs, tmp_path / "sub.csv", checkpoint, pair_checkpoint, chunk_queries=1)
    first = rerank.run(cfg)
    work = tmp_path / "sub.csv.work"
    drop_chunk(work / "pairs", "Q4")  # as if killed while scoring the second query
    embed = ix.embed_folder
    monkeypatch.setattr(ix, "embed_folder", lambda *a, **k: pytest.fail("embedded again"))
    calls = []
    real = pair_scoring.score_chunk
    monkeypatch.setattr(pair_scoring, "score_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg.overwrite = True
    again = rerank.run(cfg)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again)
    assert "Qbad.jpg" in (tmp_path / "sub.csv.skipped.csv").read_text()  # remembered from the cached stage
    # another shortlist (here a shorter one) reuses the pairs scored before: nothing is scored again
    monkeypatch.setattr(ix, "embed_folder", embed)  # the new shortlist embeds the queries again
    cfg.k = 2
    shorter = rerank.run(cfg)
    assert len(calls) == 1 and len(shorter) == 4
    # an image file replaced under the same id drops the stage's pairs: both queries are scored again
    shutil.copy(sorted(refs.iterdir())[2], queries / "Q4.jpg")
    rerank.run(cfg)
    assert len(calls) == 3
    # changed inputs drop the cache: another pair view set is scored afresh
    cfg.pair_views = ["full", "hflip"]
    rerank.run(cfg)
    assert len(calls) == 5 and "logit_hflip" in read_chunks(work).columns


def test_wrong_checkpoints_are_refused(folders, checkpoint, pair_checkpoint, tmp_path):
    queries, refs, _ = folders
    with pytest.raises(ValueError, match="pair_vit"):  # a descriptor given as the pair model
        rerank.run(pair_config(queries, refs, tmp_path / "a.csv", checkpoint, checkpoint))
    with pytest.raises(ValueError, match="descriptor"):  # and the other way round
        rerank.run(pair_config(queries, refs, tmp_path / "a.csv", pair_checkpoint, pair_checkpoint))
    with pytest.raises(ValueError, match="unknown pair view"):
        rerank.run(pair_config(queries, refs, tmp_path / "a.csv", checkpoint, pair_checkpoint, pair_views=["x"]))
    assert not (tmp_path / "a.csv").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_write_the_single_process_submission(folders, checkpoint, pair_checkpoint,
                                                                     tmp_path):
    pytest.importorskip("accelerate")
    queries, refs, _ = folders
    args = ["--queries", str(queries), "--references", str(refs), "--k", "3", "--descriptor-checkpoint",
            str(checkpoint), "--checkpoint", str(pair_checkpoint), "--views", "regions", "--pair-views", "full",
            "center", "--chunk-queries", "1", "--num-workers", "0", "--no-progress"]
    single = rerank.run(config(queries, refs, tmp_path / "single.csv", checkpoint, views="regions",
                               descriptor_only=False, checkpoint=str(pair_checkpoint),
                               pair_views=["full", "center"], chunk_queries=1))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "scripts" / "rerank.py"), *args,
                           "--output", str(tmp_path / "multi.csv")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rerank (pair ViT)") == 1 and "(2 processes)" in proc.stdout
    assert "12 pairs scored" in proc.stdout  # 2 readable queries x 3 candidates x 2 views, each once
    # The same rows in the same order; scores agree to float32 rounding (in fp32, a different batch
    # composition changes the last bits of a forward pass; under bf16 both round to the same values).
    multi, one = pd.read_csv(tmp_path / "multi.csv"), pd.read_csv(tmp_path / "single.csv")
    pd.testing.assert_frame_equal(multi.drop(columns="score"), one.drop(columns="score"))
    np.testing.assert_allclose(multi.score, one.score, rtol=0, atol=1e-6)
    assert len(single) == 6
    skipped = pd.read_csv(tmp_path / "multi.csv.skipped.csv")
    assert [Path(p).name for p in skipped.path] == ["Qbad.jpg"]


def test_verification_inliers_are_fused_and_required_by_their_calibration(folders, checkpoint, tmp_path, capsys):
    from pair_vit.match.calibration import Calibration
    from pair_vit.pair.model import build_pair_model, default_model_args, save_pair_model

    torch.manual_seed(0)
    fitted = {**CALIBRATION, "w_inliers": 0.7, "w_inlier_margin": 0.3}
    pair = tmp_path / "pair.pt"
    save_pair_model(pair, build_pair_model(default_model_args(**PAIR_ARGS)), config={}, step=0,
                    extra={"calibration": fitted})
    queries, refs, truth = folders
    sub = rerank.run(pair_config(queries, refs, tmp_path / "sub.csv", checkpoint, pair))
    assert "6 verified" in capsys.readouterr().out
    work = tmp_path / "sub.csv.work"
    verified = pd.concat([pd.read_csv(p, dtype={"query_id": str, "reference_id": str})
                          for p in sorted((work / "verify").glob("chunk_*.csv"))], ignore_index=True)
    rows = read_chunks(work).merge(verified, on=["query_id", "reference_id"])
    assert len(rows) == 6
    own = rows.set_index(["query_id", "reference_id"]).inliers
    for query, ref in zip(["Q1", "Q4"], truth):  # an exact copy matches itself far better than other photos
        assert own[query, ref] > 3 * own[query].drop(ref).max()
    expected = rows.assign(score=Calibration(**fitted).apply(rows.logit, rows.score, rows.query_id, rows.inliers))
    merged = sub.merge(expected, on=["query_id", "reference_id"], suffixes=("", "_expected"))
    np.testing.assert_allclose(merged.score, merged.score_expected, rtol=1e-5)
    with pytest.raises(ValueError, match="SIFT verification"):
        rerank.run(pair_config(queries, refs, tmp_path / "b.csv", checkpoint, pair, verify="none"))
    plain = rerank.run(pair_config(queries, refs, tmp_path / "c.csv", checkpoint, pair, verify="none",
                                   calibration="none"))
    assert len(plain) == 6 and not (tmp_path / "c.csv.work" / "verify").exists()


def test_token_recall_brings_a_voted_reference_into_the_shortlist(folders, checkpoint, tmp_path, monkeypatch):
    """With a random descriptor the copy can miss a k=1 shortlist; the query's own tokens (an exact copy) vote for
    its source, which takes the one place given to token recall."""
    from pair_vit.match import token_readings

    queries, refs, originals = folders
    plain = rerank.run(config(queries, refs, tmp_path / "a.csv", checkpoint, k=2, token_recall=0))
    assert plain.equals(rerank.run(config(queries, refs, tmp_path / "c.csv", checkpoint, k=2)))  # descriptor-only
    voted = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, k=2, token_recall=1,
                              descriptor_only=False, verify="none", calibration="none"))
    assert voted.groupby("query_id").size().to_dict() == {"Q1": 2, "Q4": 2}
    for query, source in zip(("Q1", "Q4"), originals):
        mine = voted[voted.query_id == query]
        assert source in set(mine.reference_id)  # the best-voted reference is the exact copy's source
        first = plain[plain.query_id == query].reference_id.iloc[0]
        assert first in set(mine.reference_id)  # the descriptor keeps its first place
    # its own cache: changing token_recall does not reuse the plain shortlist, and a rerun reuses its own
    calls = []
    monkeypatch.setattr(token_readings, "query_rows", lambda *a, **k: calls.append(1))
    again = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, k=2, token_recall=1, overwrite=True,
                              descriptor_only=False, verify="none", calibration="none"))
    assert not calls and again.equals(voted)
    # placed views (2 boxes a query by default, so the runs above read them): each setting has a shortlist of its
    # own; off, no crop is read; another count reads the boxes of both voted queries again
    import pair_vit.match.placed_views as pv

    monkeypatch.undo()
    read = []
    embed_boxes = pv.embed_boxes
    monkeypatch.setattr(pv, "embed_boxes", lambda *a, **k: read.append(sorted(a[2])) or embed_boxes(*a, **k))
    for views in (0, 3):
        placed = rerank.run(config(queries, refs, tmp_path / "b.csv", checkpoint, k=2, token_recall=1,
                                   token_views=views, overwrite=True, descriptor_only=False, verify="none",
                                   calibration="none"))
        for query, source in zip(("Q1", "Q4"), originals):
            assert source in set(placed[placed.query_id == query].reference_id)
    assert read == [["Q1", "Q4"]]  # only the run with views read crops, of both queries
