"""Scoring descriptor-track submissions: exact Euclidean k-NN, score = -squared distance, ISC2021 micro-AP."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pair_vit import baselines
from pair_vit.descriptor.track import DescriptorFileError, Descriptors, write_descriptors
from pair_vit.match import track

ROOT = Path(__file__).resolve().parents[2]

# 2-d vectors whose squared distances are whole numbers:
#   q1 = (0, 0): r1 1, r2 9, r3 41        q2 = (3, 4): r1 18, r2 16, r3 2
QUERY = Descriptors(["q1", "q2"], np.array([[0, 0], [3, 4]], np.float32))
REFERENCE = Descriptors(["r1", "r2", "r3"], np.array([[0, 1], [3, 0], [4, 5]], np.float32))
GT = pd.DataFrame({"query_id": ["q1", "q2"], "reference_id": ["r1", "r2"]})


def test_euclidean_neighbours_by_hand():
    sub = track.track_predictions(QUERY, REFERENCE, k=2)
    assert list(zip(sub.query_id, sub.reference_id, sub.score)) == [
        ("q1", "r1", -1.0), ("q1", "r2", -9.0), ("q2", "r3", -2.0), ("q2", "r2", -16.0)]
    # ranked together: (q1,r1) + 1/1, (q2,r3) -, (q1,r2) -, (q2,r2) + 2/4  ->  uAP (1 + 0.5) / 2
    scored = track.score_predictions(sub, GT, k=2)
    assert scored.metrics.uap == pytest.approx(0.75)
    assert scored.metrics.recall_at_p90 == pytest.approx(0.5) and scored.metrics.threshold_at_p90 == -1.0
    assert scored.metrics.recall_at_1 == pytest.approx(0.5) and scored.recall_at_k == 1.0
    # k=1 loses (q2, r2): R@1 0.5, uAP 1/2
    assert track.score_predictions(track.track_predictions(QUERY, REFERENCE, k=1), GT, 1).metrics.uap == 0.5
    # k larger than the reference set: every reference once
    assert len(track.track_predictions(QUERY, REFERENCE, k=10)) == 6


def test_squared_distance_of_hash_bits_is_the_hamming_distance():
    rng = np.random.default_rng(0)
    q_bits, r_bits = rng.integers(0, 2, (5, 256)).astype(bool), rng.integers(0, 2, (9, 256)).astype(bool)
    dist, idx = track.knn_l2(q_bits.astype(np.float32), r_bits.astype(np.float32), 3)
    hamming, _ = baselines.hamming_topk(np.packbits(q_bits, axis=1), np.packbits(r_bits, axis=1), 3)
    np.testing.assert_array_equal(dist, hamming)
    full = (q_bits[:, None, :] != r_bits[None, :, :]).sum(-1)
    np.testing.assert_array_equal(dist, np.take_along_axis(full, idx, axis=1))


@pytest.fixture
def files(tmp_path):
    write_descriptors(tmp_path / "query.h5", QUERY)
    write_descriptors(tmp_path / "reference.h5", REFERENCE)
    GT.to_csv(tmp_path / "gt.csv", index=False)
    return tmp_path


def test_run_scores_files_and_writes_the_submission(files, capsys):
    cfg = track.ScoreConfig(query_descriptors=str(files / "query.h5"),
                            reference_descriptors=str(files / "reference.h5"), ground_truth=str(files / "gt.csv"),
                            k=2, output=str(files / "sub.csv"), metrics_output=str(files / "m.json"))
    assert track.run(cfg).metrics.uap == pytest.approx(0.75)
    assert "uAP 0.7500" in capsys.readouterr().out
    sub = pd.read_csv(files / "sub.csv")
    assert list(sub.columns) == ["query_id", "reference_id", "score"] and len(sub) == 4
    assert '"uap": 0.75' in (files / "m.json").read_text()
    with pytest.raises(FileExistsError):
        track.run(cfg)


def test_sides_of_different_dimensions_are_refused(files):
    write_descriptors(files / "wide.h5", Descriptors(["r1"], np.ones((1, 3), np.float32)))
    cfg = track.ScoreConfig(query_descriptors=str(files / "query.h5"), reference_descriptors=str(files / "wide.h5"))
    with pytest.raises(DescriptorFileError, match=r"query.h5 holds 2-dimensional.*wide.h5 3-dimensional"):
        track.run(cfg)


def test_ids_are_checked_against_the_image_folders(files):
    (files / "queries").mkdir()
    for name in ("q1", "q9"):  # q9 has no vector, q2 is not an image
        (files / "queries" / f"{name}.jpg").write_bytes(b"")
    cfg = track.ScoreConfig(query_descriptors=str(files / "query.h5"),
                            reference_descriptors=str(files / "reference.h5"), queries=str(files / "queries"))
    with pytest.raises(DescriptorFileError, match=r"query.h5: 1 image name\(s\) are not images of .*\['q2'\]"):
        track.run(cfg)


def test_script_refuses_a_file_with_nan_in_one_line(files):
    import h5py

    with h5py.File(files / "nan.h5", "w") as f:
        f.create_dataset("vectors", data=np.array([[0, np.nan]], np.float32))
        f.create_dataset("image_names", data=np.array([b"q1"]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "score_descriptors.py"), "--query-descriptors",
                           str(files / "nan.h5"), "--reference-descriptors", str(files / "reference.h5")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "NaN" in done.stderr
    assert "nan.h5" in done.stderr and "Traceback" not in done.stderr
