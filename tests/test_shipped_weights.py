"""The weights shipped in the package load, are small, and find edited copies among the demo photos."""
from pathlib import Path

import numpy as np
import pytest

from pair_vit import data, demo_dir, edits
from pair_vit.match.rerank import DEFAULT_CHECKPOINT

SMOKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "smoke" / "disc21_pair"
pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped descriptor weights")


@pytest.fixture(scope="module")
def model():
    from pair_vit.descriptor import load_descriptor

    model, meta = load_descriptor(DEFAULT_CHECKPOINT)
    return model


def test_descriptor_weights_are_small_and_self_describing():
    from pair_vit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(DEFAULT_CHECKPOINT, kind="descriptor")
    assert DEFAULT_CHECKPOINT.stat().st_size < 15e6
    assert ckpt["model_args"]["embed_dim"] <= 256 and ckpt["step"] > 0 and ckpt["git_sha"]


def test_edited_copies_find_their_photo(model, tmp_path):
    """Moderate edits (intensity 0.4) of 10 photos, searched among 100 demo photos: most are found at rank 1."""
    from pair_vit.match import index as ix

    photos = data.list_images(demo_dir())
    refs = {i: photos[i] for i in sorted(photos)[:100]}
    rng = np.random.default_rng(0)
    queries = {}
    for n, ref_id in enumerate(rng.choice(sorted(refs), 10, replace=False)):
        query, _ = edits.make_query(data.load_image(refs[ref_id]), rng, intensity=0.4)
        query.save(tmp_path / f"{ref_id}.jpg")
        queries[ref_id] = tmp_path / f"{ref_id}.jpg"
    sub = ix.shortlist(model, queries, refs, k=5)
    top1 = sub.sort_values("score", ascending=False).drop_duplicates("query_id")
    assert (top1.query_id == top1.reference_id).mean() >= 0.7


@pytest.mark.skipif(not SMOKE.is_dir(), reason="../shared/data/smoke not beside the repository")
def test_real_disc21_copy_ranks_high(model):
    """A real human-made ISC2021 copy (Q10893 from R751771) among the 291 demo photos as distractors."""
    from pair_vit.match import index as ix

    refs = {**data.list_images(demo_dir()), "R751771": SMOKE / "R751771.jpg"}
    sub = ix.shortlist(model, {"Q10893": SMOKE / "Q10893.jpg"}, refs, k=20)
    assert "R751771" in set(sub.reference_id)
