"""Descriptor-track files: the ISC2021 HDF5 layout, refusal of bad files, and the export stage."""
import shutil

import h5py
import numpy as np
import pytest

from pair_vit.descriptor import track
from pair_vit.descriptor.track import DescriptorFileError, Descriptors


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_raw(path, vectors, names, **extra):
    """A file written the way isc2021's isc/io.py write_hdf5_descriptors writes one."""
    with h5py.File(path, "w") as f:
        f.create_dataset("vectors", data=np.asarray(vectors))
        f.create_dataset("image_names", data=np.array([bytes(n, "ascii") for n in names]))
        for key, value in extra.items():
            f.create_dataset(key, data=value)


def test_round_trip_in_the_isc_layout(tmp_path):
    d = Descriptors(["Q1", "Q22", "Q333"], random_unit(3, 256), skipped=["Q4"])
    track.write_descriptors(tmp_path / "q.h5", d)
    back = track.read_descriptors(tmp_path / "q.h5")
    assert back.ids == d.ids and back.skipped == ["Q4"] and back.dim == 256
    np.testing.assert_array_equal(back.vectors, d.vectors)
    with h5py.File(tmp_path / "q.h5", "r") as f:  # what isc/io.py read_descriptors does with the file
        assert f["vectors"].dtype == np.float32 and f["vectors"].shape == (3, 256)
        assert f["image_names"].dtype.kind == "S"
        assert np.array(f["image_names"][:], dtype=object).astype(str).tolist() == d.ids


def test_reads_isc_names_with_folders_and_suffixes(tmp_path):
    write_raw(tmp_path / "r.h5", random_unit(2, 8), ["images/R000001.jpg", "R000002.png"])
    assert track.read_descriptors(tmp_path / "r.h5").ids == ["R000001", "R000002"]


@pytest.mark.parametrize("vectors, names, message", [
    (np.full((2, 4), np.nan, np.float32), ["a", "b"], "2 vector.*NaN.*'a'"),
    (random_unit(2, 257), ["a", "b"], "257-dimensional.*1 to 256"),
    (random_unit(3, 4), ["a", "b"], "3 vectors but 2 image names"),
    (random_unit(2, 4), ["a", "a"], "repeated image name.*'a'"),
])
def test_bad_files_are_refused_saying_which(tmp_path, vectors, names, message):
    write_raw(tmp_path / "bad.h5", vectors, names)
    with pytest.raises(DescriptorFileError, match=message) as err:
        track.read_descriptors(tmp_path / "bad.h5")
    assert "bad.h5" in str(err.value)
    with pytest.raises(DescriptorFileError, match=message):  # and never written
        track.write_descriptors(tmp_path / "out.h5", Descriptors(names, vectors))
    assert not (tmp_path / "out.h5").exists()


def test_missing_dataset_and_non_hdf5_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "novec.h5", "w") as f:
        f.create_dataset("image_names", data=np.array([b"a"]))
    with pytest.raises(DescriptorFileError, match="no 'vectors' dataset"):
        track.read_descriptors(tmp_path / "novec.h5")
    (tmp_path / "text.h5").write_text("query_id,reference_id\n")
    with pytest.raises(DescriptorFileError, match="not a readable HDF5 file"):
        track.read_descriptors(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError):
        track.read_descriptors(tmp_path / "absent.h5")


def test_ids_must_be_the_images_less_the_skipped_ones():
    d = Descriptors(["a", "b"], random_unit(2, 4), skipped=["c"])
    track.check_ids(d, ["a", "b", "c"], "q.h5")
    with pytest.raises(DescriptorFileError, match=r"1 image name\(s\) are not images of .*\['b'\]"):
        track.check_ids(d, ["a", "c"], "q.h5")
    with pytest.raises(DescriptorFileError, match=r"have no vector and are not listed as skipped.*\['d'\]"):
        track.check_ids(d, ["a", "b", "c", "d"], "q.h5")


def test_sides_of_different_dimensions_are_refused():
    q, r = Descriptors(["q"], random_unit(1, 64)), Descriptors(["r"], random_unit(1, 256))
    with pytest.raises(DescriptorFileError, match="q.h5 holds 64-dimensional.*r.h5 256-dimensional"):
        track.check_sides(q, r, "q.h5", "r.h5")


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def folders(tmp_path_factory, train_photos):
    """Queries: 3 photos; references: 4 photos and one unreadable file."""
    root = tmp_path_factory.mktemp("export")
    photos = sorted(train_photos.glob("*.jpg"))
    for name, chosen in (("queries", photos[:3]), ("references", photos[3:7])):
        (root / name).mkdir()
        for path in chosen:
            shutil.copy(path, root / name / path.name)
    (root / "references" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_export_writes_both_sides_and_lists_unreadable_images(folders, tmp_path):
    cfg = track.ExportConfig(queries=str(folders / "queries"), references=str(folders / "references"),
                             out=str(tmp_path), progress=False, num_workers=0)
    sides = track.run(cfg)
    q, r = track.read_descriptors(tmp_path / "query.h5"), track.read_descriptors(tmp_path / "reference.h5")
    assert len(q.ids) == 3 and len(r.ids) == 4 and r.skipped == ["broken"] and "broken" not in r.ids
    assert q.dim == r.dim == 256 and np.allclose(np.linalg.norm(r.vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(q.vectors, sides["query"].vectors)
    assert "broken.jpg" in (tmp_path / "skipped.csv").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        track.run(cfg)


def test_export_of_hash_bits_and_refusals(folders, tmp_path):
    base = dict(queries=str(folders / "queries"), references=str(folders / "references"), progress=False)
    track.run(track.ExportConfig(out=str(tmp_path / "pdq"), method="pdq", **base))
    pdq = track.read_descriptors(tmp_path / "pdq" / "reference.h5")
    assert pdq.dim == 256 and set(np.unique(pdq.vectors)) <= {0.0, 1.0} and pdq.skipped == ["broken"]
    with pytest.raises(ValueError, match="applies to the descriptor, not to phash"):
        track.run(track.ExportConfig(out=str(tmp_path / "x"), method="phash", normalise="subtract",
                                     train=str(folders), **base))
    with pytest.raises(ValueError, match="needs training photos"):
        track.run(track.ExportConfig(out=str(tmp_path / "y"), normalise="stretch", **base))


def test_export_with_subtraction_saves_and_reuses_training_descriptors(folders, train_photos, tmp_path):
    base = dict(queries=str(folders / "queries"), references=str(folders / "references"), progress=False,
                num_workers=0, normalise="subtract", subtract_k=2)
    first = track.run(track.ExportConfig(out=str(tmp_path / "a"), train=str(train_photos), **base))
    assert len(track.read_descriptors(tmp_path / "a" / "train.h5").ids) == 12
    again = track.run(track.ExportConfig(out=str(tmp_path / "b"), train=str(tmp_path / "a" / "train.h5"), **base))
    np.testing.assert_allclose(again["reference"].vectors, first["reference"].vectors, atol=1e-6)
    plain = track.run(track.ExportConfig(out=str(tmp_path / "c"), **{**base, "normalise": "none"}))
    assert np.abs(first["query"].vectors - plain["query"].vectors).max() > 1e-3  # the subtraction moved them
