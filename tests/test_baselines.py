"""Perceptual-hash peers: Hamming top-k on hand cases, and real photos matching their copies."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pair_vit import baselines, demo_dir

PHOTOS = sorted(Path(str(demo_dir())).glob("clothing_cc0/*.jpg"))[:6]


def test_hamming_topk_hand_case():
    refs = np.packbits(np.array([[0] * 8, [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]], dtype=bool), axis=1)
    query = np.packbits(np.array([[1, 0, 0, 0, 0, 0, 0, 0]], dtype=bool), axis=1)
    dist, idx = baselines.hamming_topk(query, refs, k=2)
    assert idx.tolist() == [[0, 2]] and dist.tolist() == [[1, 1]]  # tie broken by reference index
    dist, idx = baselines.hamming_topk(query, refs, k=10)
    assert idx.shape == (1, 3) and dist[0, -1] == 7


@pytest.mark.parametrize("method", baselines.HASH_METHODS)
def test_recompressed_copy_ranks_its_reference_first(method, tmp_path):
    refs, queries = tmp_path / "refs", tmp_path / "queries"
    refs.mkdir(), queries.mkdir()
    for i, p in enumerate(PHOTOS):
        Image.open(p).save(refs / f"R{i}.png")
    Image.open(PHOTOS[3]).resize((200, 260)).save(queries / "Q0.jpg", quality=40)
    (queries / "Q1.jpg").write_bytes(b"broken")
    from pair_vit import data

    report = data.SkipReport()
    sub = baselines.hash_submission(data.list_images(queries), data.list_images(refs), method, k=3, report=report)
    assert list(sub.columns) == ["query_id", "reference_id", "score"]
    assert sub.reference_id.iloc[0] == "R3" and sub.score.iloc[0] > 0.8
    assert len(sub) == 3 and set(sub.query_id) == {"Q0"}
    assert [Path(p).name for p, _ in report] == ["Q1.jpg"]


def test_sift_finds_a_cropped_rotated_copy(tmp_path):
    refs, queries = tmp_path / "refs", tmp_path / "queries"
    refs.mkdir(), queries.mkdir()
    for i, p in enumerate(PHOTOS):
        Image.open(p).save(refs / f"R{i}.jpg")
    src = Image.open(PHOTOS[2])
    w, h = src.size
    src.crop((w // 5, h // 5, w, h)).rotate(15, expand=True).save(queries / "Q0.jpg", quality=60)
    from pair_vit import data

    sub = baselines.sift_submission(data.list_images(queries), data.list_images(refs), k=3)
    assert sub.reference_id.iloc[0] == "R2" and sub.score.iloc[0] >= 10
    assert sub.score.iloc[0] > 2 * sub.score.iloc[1]


def test_ransac_inliers_needs_matches():
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    assert baselines.ransac_inliers(empty, empty) == 0


def _unit_rows(rng, n):
    d = rng.random((n, 128)).astype(np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.mark.parametrize("model", ["homography", "affine"])
def test_ransac_inliers_counts_an_affine_map(model):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (60, 2)).astype(np.float32)
    desc = _unit_rows(rng, 60)
    moved = (xy @ np.array([[0.8, 0.3], [-0.3, 0.8]], np.float32).T + [20, 5]).astype(np.float32)
    assert baselines.ransac_inliers((xy, desc), (moved, desc), one_to_one=True, model=model) == 60


def test_one_to_one_matching_refuses_many_matches_on_one_keypoint():
    # ten query keypoints look like the same reference keypoint (a repeated pattern): one match, not ten
    rng = np.random.default_rng(1)
    d0 = _unit_rows(rng, 1)
    query = (rng.uniform(0, 300, (10, 2)).astype(np.float32), np.repeat(d0, 10, axis=0))
    ref = (rng.uniform(0, 300, (6, 2)).astype(np.float32), np.concatenate([d0, -_unit_rows(rng, 5)]))
    assert baselines.ransac_inliers(query, ref, one_to_one=True, model="affine") == 0
    with pytest.raises(ValueError, match="unknown geometric model"):
        baselines.ransac_inliers(query, ref, model="similarity")
