"""Normalisation inside the vectors: negative embedding subtraction and descriptor stretching."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pair_vit
from pair_vit import data
from pair_vit.descriptor import normalise as norm
from pair_vit.descriptor import track


def unit(rows) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


NEGATIVES = unit([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])


def test_subtraction_by_hand():
    x = unit([[1.0, 0.0]])
    # nearest 2 negatives of x: [0.6, 0.8] (cosine 0.6) and [0, 1] (cosine 0); mean [0.3, 0.9]
    got = norm.subtract_negatives(x, NEGATIVES, k=2, beta=0.5)
    np.testing.assert_allclose(got, unit([[1 - 0.15, -0.45]]), atol=1e-6)
    # alpha 1: weights 0.6 and 0, i.e. the nearest negative alone
    got = norm.subtract_negatives(x, NEGATIVES, k=2, beta=0.5, alpha=1.0)
    np.testing.assert_allclose(got, unit([[1 - 0.3, -0.4]]), atol=1e-6)
    # twice: the second pass searches again with the new vector
    once = norm.subtract_negatives(x, NEGATIVES, k=1, beta=0.5)
    twice = norm.subtract_negatives(x, NEGATIVES, k=1, beta=0.5, iterations=2)
    np.testing.assert_allclose(twice, norm.subtract_negatives(once, NEGATIVES, k=1, beta=0.5), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(twice, axis=1), 1.0, atol=1e-6)


def test_a_vector_that_would_vanish_is_kept():
    x = unit([[0.6, 0.8]])
    np.testing.assert_allclose(norm.subtract_negatives(x, NEGATIVES, k=1, beta=1.0), x, atol=1e-6)


def test_stretch_factors_by_hand():
    x = unit([[1.0, 0.0], [-0.6, -0.8]])
    # x0: nearest 2 at cosines 0.6 and 0 -> 2.5 * 0.3; x1: cosines 0.6 ([-1, 0]) and -0.8 -> mean < 0: the floor
    np.testing.assert_allclose(norm.stretch_factors(x, NEGATIVES, n=2, factor=2.5), [0.75, norm.MIN_STRETCH],
                               rtol=1e-5)
    q, r = norm.normalise(x, x, NEGATIVES, norm.NormaliseConfig(normalise="stretch", stretch_n=2, stretch_factor=2.5))
    np.testing.assert_allclose(q[0], 0.75 * x[0], rtol=1e-5)
    np.testing.assert_array_equal(r, x)  # references are not stretched


def test_normalise_needs_training_descriptors_and_valid_settings():
    x = unit([[1.0, 0.0]])
    q, r = norm.normalise(x, x, None, norm.NormaliseConfig())
    np.testing.assert_array_equal(q, x)
    with pytest.raises(ValueError, match="training photos"):
        norm.normalise(x, x, None, norm.NormaliseConfig(normalise="subtract"))
    with pytest.raises(ValueError, match="same descriptor"):
        norm.normalise(x, x, np.ones((3, 4), np.float32), norm.NormaliseConfig(normalise="subtract"))
    with pytest.raises(ValueError, match="stretch-factor"):
        norm.check_settings(norm.NormaliseConfig(normalise="stretch", stretch_factor=0))


# ----------------------------------------------------------------------------- on demo photos


def _edited(image: Image.Image) -> Image.Image:
    """A copy: cropped by a tenth on each side, halved, JPEG quality 50."""
    w, h = image.size
    image = image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w // 2, h // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=50)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def clothing():
    """Shipped descriptor: (negatives: 80 train-side clothing photos, references: 16 dev-side ones, queries: their
    edited copies). The photos are garments on floors: every two of them look alike."""
    from pair_vit.descriptor.model import embed

    model = track.load_model()
    photos = data.list_images(Path(str(pair_vit.demo_dir())) / "clothing_cc0")
    train = dict(list(data.split_images(photos, "train").items())[:80])
    dev = list(data.split_images(photos, "dev").values())[:16]
    images = [Image.open(p).convert("RGB") for p in dev]
    negatives = track.describe(train, model=model, amp=False).vectors
    return negatives, embed(model, images, amp=False), embed(model, [_edited(i) for i in images], amp=False)


def _copies_and_lookalikes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    diagonal = np.eye(len(values), dtype=bool)
    return values[diagonal], values[~diagonal]


def test_subtraction_lowers_lookalike_similarity(clothing):
    negatives, references, queries = clothing
    cfg = norm.NormaliseConfig(normalise="subtract")
    new_q, new_r = norm.normalise(queries, references, negatives, cfg)
    copies, lookalikes = _copies_and_lookalikes(queries @ references.T)
    new_copies, new_lookalikes = _copies_and_lookalikes(new_q @ new_r.T)
    # look-alikes move apart (the 2026-12-07 descriptor already puts them at a mean similarity of 0.06, which
    # subtraction lowers by a third; 0.05 absolute with the descriptor before) ...
    assert lookalikes.mean() > 0 and new_lookalikes.mean() < 0.8 * lookalikes.mean()
    assert new_copies.mean() - new_lookalikes.mean() > copies.mean() - lookalikes.mean()   # ... more than copies
    assert new_q.shape == queries.shape and np.allclose(np.linalg.norm(new_r, axis=1), 1, atol=1e-5)


def test_stretching_lowers_lookalike_scores_more_than_copy_scores(clothing):
    negatives, references, queries = clothing
    # VisionForce's n = 5, with a factor that scales every query up (> 1), whatever the shipped descriptor's
    # similarity level: these clothing photos all resemble the training photos
    mean_sims = norm.nearest_negatives(queries, negatives, 5)[0].mean(axis=1)
    assert mean_sims.min() > 0.1
    cfg = norm.NormaliseConfig(normalise="stretch", stretch_n=5, stretch_factor=1.2 / float(mean_sims.min()))

    def scores(q, r):  # the track's score: -squared Euclidean distance
        return -((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)

    new_q, new_r = norm.normalise(queries, references, negatives, cfg)
    copies, lookalikes = _copies_and_lookalikes(scores(queries, references))
    new_copies, new_lookalikes = _copies_and_lookalikes(scores(new_q, new_r))
    assert new_lookalikes.mean() < lookalikes.mean()
    assert lookalikes.mean() - new_lookalikes.mean() > copies.mean() - new_copies.mean()
    # the order of each query's references is unchanged
    order = np.argsort(-queries @ references.T, axis=1)
    np.testing.assert_array_equal(np.argsort(-scores(new_q, new_r), axis=1), order)
