"""The library API (pair_vit.CopyDetector) on the demo photos with the shipped weights: rerank.py's numbers,
incremental add, remove, save/load round trip, refusals (other weights, duplicate ids, half-written saves), bad
queries."""
from __future__ import annotations

import io
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

import pair_vit
from pair_vit import data
from pair_vit.match import index as ix
from pair_vit.match import rerank, store
from pair_vit.match.detector import CopyDetector

ROOT = Path(__file__).resolve().parents[2]
DEMO = Path(str(pair_vit.demo_dir()))
FAST = {"num_workers": 0}


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    """8 look-alike clothing photos and 2 skimage photos."""
    return (sorted(data.list_images(DEMO / "clothing_cc0").values())[:8]
            + [DEMO / "skimage" / "chelsea.jpg", DEMO / "skimage" / "rocket.jpg"])


def copy_to(folder: Path, paths) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder / p.name)
    return folder


def edited(photos: list[Path], folder: Path) -> Path:
    """Queries: a crop of chelsea, a mirrored clothing photo, a rotated one, an unrelated photo, an unreadable file."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.open(photos[8]).crop((90, 0, 300, 210)).resize((150, 150)).save(folder / "cat_crop.jpg")
    ImageOps.mirror(Image.open(photos[2])).save(folder / "flip.jpg")
    Image.open(photos[5]).rotate(8).save(folder / "rot.png")
    shutil.copy(DEMO / "sklearn" / "china.jpg", folder / "china.jpg")
    (folder / "bad.jpg").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def saved(photos, tmp_path_factory) -> Path:
    """A collection of the first 6 photos, saved."""
    detector = CopyDetector(**FAST)
    detector.add(photos[:6])
    return detector.save(tmp_path_factory.mktemp("saved") / "collection")


@pytest.fixture()
def collection(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "collection"))


def test_same_numbers_as_rerank_py(photos, tmp_path):
    refs, queries = copy_to(tmp_path / "refs", photos), edited(photos, tmp_path / "queries")
    sub = rerank.run(rerank.RerankConfig(queries=str(queries), references=str(refs), output=str(tmp_path / "s.csv"),
                                         k=6, progress=False, **FAST))
    detector = CopyDetector(shortlist=6, **FAST)
    detector.add(refs)
    found = detector.match(queries, k=6)
    assert list(found.columns) == ["query_id", "reference_id", "score", "is_copy"]
    pd.testing.assert_frame_equal(found[["query_id", "reference_id"]], sub[["query_id", "reference_id"]])
    np.testing.assert_allclose(found.score, sub.score, rtol=0, atol=1e-6)
    assert found.attrs["skipped"] == {"bad": "not an image"}
    top = found.groupby("query_id").head(1).set_index("query_id")
    copies = {"cat_crop": "chelsea", "flip": photos[2].stem, "rot": photos[5].stem}
    assert top.reference_id[list(copies)].to_dict() == copies
    threshold = detector.calibration.threshold_p90
    assert found.is_copy.tolist() == (found.score >= threshold).tolist()
    assert top.is_copy[["cat_crop", "flip", "rot"]].all() and not top.is_copy["china"]
    # the rows per query are the caller's; a threshold too
    fewer = detector.match(queries, k=2, threshold=0.0)
    assert fewer.groupby("query_id").size().max() == 2 and fewer.is_copy.all()


def test_incremental_add_embeds_only_new_references_and_keeps_old_vectors(collection, photos, monkeypatch):
    detector = CopyDetector.load(collection)
    assert sorted(detector.ids) == sorted(p.stem for p in photos[:6]) and detector.folder == collection
    before = detector.index.index.reconstruct_n(0, detector.index.n_rows)
    embedded = []
    real = ix.embed_folder
    monkeypatch.setattr(ix, "embed_folder", lambda model, images, *a, **k: embedded.append(sorted(images))
                        or real(model, images, *a, **k))
    report = detector.add(photos[:9])  # 6 already there (same files), 3 new
    assert embedded == [sorted(p.stem for p in photos[6:9])]
    assert sorted(report.added) == sorted(p.stem for p in photos[6:9]) and len(report.already) == 6
    assert np.array_equal(detector.index.index.reconstruct_n(0, len(before)), before)  # bit for bit
    detector.save()
    again = CopyDetector.load(collection)
    assert len(again) == 9 and np.array_equal(again.index.index.reconstruct_n(0, len(before)), before)
    query = photos[7]  # an exact copy of a reference added second
    pd.testing.assert_frame_equal(detector.match(query), again.match(query))
    assert again.match(query).reference_id.iloc[0] == photos[7].stem


def test_remove_and_round_trip(collection, photos):
    detector = CopyDetector.load(collection)
    gone = photos[2].stem
    with pytest.raises(ValueError, match="not in the collection"):
        detector.remove([gone, "nope"])
    assert gone in detector  # all or nothing
    kept_before = detector.store.vectors([photos[3].stem], detector.index.dim)[photos[3].stem].copy()
    detector.remove(gone)
    assert gone not in detector and len(detector) == 5
    assert gone not in set(detector.match(photos[2], k=5).reference_id)
    detector.save()
    again = CopyDetector.load(collection)
    assert gone not in again and len(again) == 5
    assert np.array_equal(again.store.vectors([photos[3].stem], again.index.dim)[photos[3].stem], kept_before)
    assert again.match(photos[3]).reference_id.iloc[0] == photos[3].stem
    again.add(photos[2])  # the same file may come back
    assert gone in again


def test_other_weights_and_settings_are_refused(collection, tmp_path):
    import torch

    from pair_vit.checkpoint import save_checkpoint
    from pair_vit.descriptor.model import build_descriptor
    from pair_vit.pair.model import build_pair_model, default_model_args, save_pair_model

    torch.manual_seed(0)
    args = {"backbone": "resnet18", "embed_dim": 32, "image_size": 64, "gem_p": 3.0}
    other = tmp_path / "other_descriptor.pt"
    save_checkpoint(other, kind="descriptor", model=build_descriptor(args), model_args=args)
    with pytest.raises(ix.IndexMismatchError) as err:
        CopyDetector.load(collection, descriptor_checkpoint=str(other))
    assert "weights/descriptor.pt" in str(err.value) and "other_descriptor.pt" in str(err.value)
    pair = tmp_path / "other_pair.pt"
    small = default_model_args(input_size=[32, 64], backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    save_pair_model(pair, build_pair_model(small), config={}, step=0)
    with pytest.raises(ix.IndexMismatchError, match="weights/pair_vit.pt.*other_pair.pt"):
        CopyDetector.load(collection, checkpoint=str(pair), verify="none")
    with pytest.raises(ix.IndexMismatchError, match="reference_views='halves'"):
        CopyDetector.load(collection, reference_views="full")
    loaded = CopyDetector.load(collection, shortlist=3)  # a per-match setting may change
    assert loaded.settings.shortlist == 3 and loaded.settings.reference_views == "halves"
    with pytest.raises(FileExistsError, match="overwrite"):
        CopyDetector(**FAST).save(collection)


def test_duplicate_reference_id_is_refused_naming_both_files(collection, photos, tmp_path):
    detector = CopyDetector.load(collection)
    impostor = tmp_path / "elsewhere" / photos[0].name
    impostor.parent.mkdir()
    shutil.copy(photos[9], impostor)
    with pytest.raises(data.DuplicateIdError) as err:
        detector.add([photos[7], impostor])
    assert str(photos[0].resolve()) in str(err.value) and str(impostor.resolve()) in str(err.value)
    assert photos[7].stem not in detector  # refused before any work
    with pytest.raises(data.DuplicateIdError, match="used by two images"):
        detector.add([photos[7], tmp_path / "x" / photos[7].name])
    detector.add({"pil": Image.open(photos[9])})
    with pytest.raises(data.DuplicateIdError, match="in-memory"):
        detector.add({"pil": Image.open(photos[8])})


def test_bad_queries_get_no_rows_and_a_reason(collection, photos, tmp_path):
    detector = CopyDetector.load(collection)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photos[1].read_bytes()[:600])
    image = Image.open(photos[1])
    found = detector.match([tmp_path / "bad.jpg", tmp_path / "missing.jpg", image, Image.open(truncated)],
                           ids=["bad", "missing", "good", "cut"])
    assert set(found.query_id) == {"good"} and found.reference_id.iloc[0] == photos[1].stem
    assert set(found.attrs["skipped"]) == {"bad", "missing", "cut"}
    assert "file not found" in found.attrs["skipped"]["missing"]
    nothing = detector.match(tmp_path / "bad.jpg")
    assert len(nothing) == 0 and list(nothing.columns) == ["query_id", "reference_id", "score", "is_copy"]
    # a PIL query is matched as the same image in a file
    image.save(tmp_path / "good.png")
    pd.testing.assert_frame_equal(detector.match(tmp_path / "good.png"), detector.match({"good": image}))


def test_a_killed_save_leaves_the_previous_save_whole(collection, photos):
    """A process killed inside the commit: the next load rolls the journal back to the previous save."""
    script = textwrap.dedent(f"""
        import os, json
        from pair_vit.match import store
        from pair_vit.match.detector import CopyDetector
        detector = CopyDetector.load({str(collection)!r}, num_workers=0)
        detector.add({str(photos[8])!r})
        detector.remove({photos[0].stem!r})
        dumps = json.dumps
        store.json = type("J", (), {{"dumps": staticmethod(lambda v: os._exit(9)), "loads": json.loads}})
        detector.save()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert len(list(collection.glob("index-*"))) == 2  # the new index was written, never committed
    detector = CopyDetector.load(collection)
    assert sorted(detector.ids) == sorted(p.stem for p in photos[:6])
    detector.add(photos[8])
    detector.save()  # the next save clears the orphaned index and the journal
    assert len(list(collection.glob("index-*"))) == 1 and len(CopyDetector.load(collection)) == 7
    assert not (collection / (store.DB_FILE + "-journal")).exists()


def test_unfinished_or_damaged_folders_are_refused(collection, photos, tmp_path, monkeypatch):
    detector = CopyDetector.load(collection)
    real = store.ReferenceStore._apply

    def killed(self, conn, meta):  # the new database is complete, the process dies before renaming it
        real(self, conn, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(store.ReferenceStore, "_apply", killed)
    with pytest.raises(KeyboardInterrupt):
        detector.save(tmp_path / "first")
    monkeypatch.undo()
    with pytest.raises(store.IncompleteIndexError, match="never saved there, or its first save was interrupted"):
        CopyDetector.load(tmp_path / "first")
    with sqlite3.connect(collection / store.DB_FILE) as conn:
        conn.execute("DELETE FROM refs WHERE id = ?", (photos[0].stem,))
    with pytest.raises(store.IncompleteIndexError, match="damaged"):
        CopyDetector.load(collection)
    for index_dir in collection.glob("index-*"):
        shutil.rmtree(index_dir)
    with pytest.raises(store.IncompleteIndexError, match="missing"):
        CopyDetector.load(collection)


def test_the_store_keeps_tokens_and_a_thumbnail_not_pixels(collection, photos):
    detector = CopyDetector.load(collection)
    layout = detector.pair_layout
    assert layout.kind == "tokens" and layout.shape == (112, 10, 10)  # Lite0 at 160 px
    ref_id = photos[0].stem
    tokens = detector.store.pair_inputs([ref_id], layout)[ref_id]
    assert tokens.dtype == torch.float16 and tuple(tokens.shape) == layout.shape
    with sqlite3.connect(collection / store.DB_FILE) as conn:
        pair, thumb, xy = conn.execute("SELECT length(pair), thumbnail, length(xy) FROM refs WHERE id = ?",
                                       (ref_id,)).fetchone()
    assert pair == 112 * 10 * 10 * 2 and xy > 0  # float16 tokens; keypoints while verifying with SIFT
    thumbnail = Image.open(io.BytesIO(thumb))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == store.THUMBNAIL_SIDE
    # the stored tokens are the model's tokens of the reference, as rerank.py computes them
    from pair_vit.pair.scoring import TensorCache, load_side, trunk_tokens

    half = detector.pair.half_size
    pixels = TensorCache({ref_id: photos[0]}, half, data.SkipReport(), 0, load_side(half)).get(ref_id)
    fresh = trunk_tokens(detector.pair, pixels[None], amp=detector.settings.amp)[0].to(torch.float16)
    assert torch.equal(fresh, tokens)


def test_a_format_1_collection_is_refused_with_the_rebuild_command(collection):
    with sqlite3.connect(collection / store.DB_FILE) as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'store_format'")
    with pytest.raises(store.StoreFormatError, match="pair-vit index add NEW_FOLDER IMAGES"):
        CopyDetector.load(collection)


def test_without_sift_no_keypoints_are_kept(photos, tmp_path):
    detector = CopyDetector(verify="none", calibration="none", **FAST)
    detector.add(photos[:3])
    folder = detector.save(tmp_path / "nosift")
    with sqlite3.connect(folder / store.DB_FILE) as conn:
        assert conn.execute("SELECT max(length(xy) + length(descriptors)) FROM refs").fetchone()[0] == 0
    found = CopyDetector.load(folder).match(photos[1], k=1)
    assert found.reference_id.iloc[0] == photos[1].stem
    with pytest.raises(ix.IndexMismatchError, match="keeps no SIFT keypoints"):
        CopyDetector.load(folder, verify="sift", calibration="none")


def test_trained_factory_survives_remove(photos, tmp_path):
    detector = CopyDetector(factory="IVF2,Flat", nprobe=2, **FAST)
    detector.add(photos[:4])
    detector.remove(photos[0].stem)
    assert len(detector) == 3 and detector.match(photos[2], k=1).reference_id.iloc[0] == photos[2].stem
    folder = detector.save(tmp_path / "ivf")
    assert CopyDetector.load(folder).index.factory == "IVF2,Flat"


def test_exported_lazily_from_pair_vit():
    assert pair_vit.CopyDetector is CopyDetector
    code = "import sys, pair_vit; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]


def test_token_recall_gives_rerank_py_numbers_and_follows_add_and_remove(photos, tmp_path, monkeypatch):
    from pair_vit.pair import scoring

    refs, queries = copy_to(tmp_path / "refs", photos), edited(photos, tmp_path / "queries")
    sub = rerank.run(rerank.RerankConfig(queries=str(queries), references=str(refs), output=str(tmp_path / "s.csv"),
                                         k=4, token_recall=2, progress=False, **FAST))
    detector = CopyDetector(shortlist=4, token_recall=2, **FAST)
    detector.add(refs)
    passes = []  # trunk passes over query pixels in the pair stage: none, token recall already read the queries
    real = scoring.trunk_tokens
    monkeypatch.setattr(scoring, "trunk_tokens", lambda model, x, *a, **k: passes.append(x.shape[-1]) or
                        real(model, x, *a, **k))
    found = detector.match(queries, k=4)
    assert passes and set(passes) == {160, 320}  # token recall's two readings only (the boxes are cropped tokens)
    pd.testing.assert_frame_equal(found[["query_id", "reference_id"]], sub[["query_id", "reference_id"]])
    np.testing.assert_allclose(found.score, sub.score, rtol=0, atol=1e-6)
    assert len(detector._tokens) == len(photos)
    detector.remove(photos[8].stem)  # chelsea: its crop can no longer find it, through either path
    assert photos[8].stem not in set(detector.match(queries / "cat_crop.jpg", k=4).reference_id)
    detector.add(photos[8])
    assert len(detector._tokens) == len(photos) and detector._tokens.ids[-1] == photos[8].stem
    assert detector.match(queries / "cat_crop.jpg", k=1).reference_id.iloc[0] == photos[8].stem
