"""The copy-edit battery on real demo photos: every family, determinism, sampling rules, scaling."""
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

import albumentations as A
import pair_vit
from pair_vit.edits import (DONOR_FAMILIES, EDIT_FAMILIES, Edit, apply_chain, make_query, parse_weights,
                            sample_chain)
from pair_vit.edits.base import albu
from pair_vit.edits.battery import FAMILIES

BRIEF_FAMILIES = {
    "crop", "flip", "rot90", "rotate", "shear", "perspective", "overlay_text", "overlay_emoji", "meme",
    "screenshot", "paste_onto", "paste_over", "collage", "pad_square", "pixelize", "blur", "noise", "jpeg",
    "grayscale", "invert", "solarize", "posterize", "color_jitter", "channel_shuffle", "opacity",
}
TRANSFORM_FAMILIES = [n for n in EDIT_FAMILIES if FAMILIES[n].transform is not None]


def _load(*parts):
    return Image.open(pair_vit.demo_dir().joinpath(*parts)).convert("RGB")


@pytest.fixture(scope="module")
def photos():
    # Colour photos: channel_shuffle / grayscale are no-ops on grey images by nature.
    return [_load("skimage", "chelsea.jpg"), _load("skimage", "astronaut.jpg"), _load("skimage", "coffee.jpg")]


@pytest.fixture(scope="module")
def donors():
    return [_load("sklearn", "china.jpg"), _load("sklearn", "flower.jpg")]


def _single(name, intensity, seed, n_donors=2):
    return sample_chain(np.random.default_rng(seed), intensity, (1, 1), [name], n_donors=n_donors)


def _changed(out, image):
    if out.size != image.size:
        return True
    return np.abs(np.asarray(out, dtype=int) - np.asarray(image, dtype=int)).mean() > 0.1


def test_family_lists():
    assert set(EDIT_FAMILIES) == BRIEF_FAMILIES and len(EDIT_FAMILIES) == len(BRIEF_FAMILIES)
    assert set(DONOR_FAMILIES) == {"paste_onto", "paste_over", "collage"}


@pytest.mark.parametrize("intensity", [0.0, 1.0])
@pytest.mark.parametrize("name", EDIT_FAMILIES)
def test_each_family_edits_a_real_photo(name, intensity, photos, donors):
    for seed, image in enumerate(photos):
        chain = _single(name, intensity, seed)
        assert [e.name for e in chain] == [name]
        out = apply_chain(image, chain, donors)
        assert out.mode == "RGB"
        assert min(out.size) >= 32 and max(out.size) <= 2 * max(image.size)
        assert _changed(out, image), (name, intensity, chain[0].params)


@pytest.mark.parametrize("name", EDIT_FAMILIES)
def test_each_family_is_deterministic(name, photos, donors):
    chain = _single(name, 0.7, 11)
    a = apply_chain(photos[0], chain, donors)
    b = apply_chain(photos[0].copy(), [Edit(e.name, dict(e.params)) for e in chain], list(donors))
    assert a.size == b.size and a.tobytes() == b.tobytes()


def test_make_query_same_seed_same_bytes_different_seed_different_chain(photos, donors):
    for seed in range(6):
        a, names_a = make_query(photos[1], seed, 0.6, donors=donors)
        b, names_b = make_query(photos[1], np.random.default_rng(seed), 0.6, donors=donors)
        assert names_a == names_b and a.tobytes() == b.tobytes()
    chains = [sample_chain(np.random.default_rng(s), 0.5, n_donors=2) for s in range(10)]
    assert all(chains[i] != chains[i + 1] for i in range(9))


def test_same_chain_applies_to_several_images(photos):
    chain = sample_chain(np.random.default_rng(3), 0.8, (3, 3))
    outs = [apply_chain(p, chain) for p in photos]
    assert all(o.mode == "RGB" for o in outs)
    assert outs[0].tobytes() != outs[1].tobytes()


def test_sample_chain_respects_n_edits():
    lengths = {len(sample_chain(np.random.default_rng(s), 0.5, (2, 4))) for s in range(60)}
    assert lengths == {2, 3, 4}
    assert all(len(sample_chain(np.random.default_rng(s), 0.5, (1, 1))) == 1 for s in range(20))
    # The count is capped by the number of allowed families (distinct families per chain).
    assert len(sample_chain(np.random.default_rng(0), 0.5, (3, 3), ["jpeg", "blur"])) == 2
    with pytest.raises(ValueError):
        sample_chain(np.random.default_rng(0), 0.5, (0, 2))


def test_sample_chain_respects_families_and_donors():
    allowed = {"crop", "jpeg", "meme"}
    for s in range(30):
        assert {e.name for e in sample_chain(np.random.default_rng(s), 0.5, families=sorted(allowed))} <= allowed
    no_donor = [e.name for s in range(200) for e in sample_chain(np.random.default_rng(s), 0.5, (3, 3))]
    assert not set(no_donor) & set(DONOR_FAMILIES)
    with_donor = [e for s in range(200) for e in sample_chain(np.random.default_rng(s), 0.5, (3, 3), n_donors=3)]
    donor_edits = [e for e in with_donor if e.name in DONOR_FAMILIES]
    assert donor_edits and all(0 <= e.params["donor"] < 3 for e in donor_edits)
    assert {e.name for e in with_donor} == set(EDIT_FAMILIES)


def test_sample_chain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown edit family 'sepia'.*crop.*opacity"):
        sample_chain(np.random.default_rng(0), families=["crop", "sepia"])
    with pytest.raises(ValueError, match="donor"):
        sample_chain(np.random.default_rng(0), families=["collage"], n_donors=0)
    with pytest.raises(ValueError, match="intensity"):
        sample_chain(np.random.default_rng(0), intensity=1.5)


def test_sample_chain_weights_shift_the_draws():
    def counts(weights):
        names = [e.name for s in range(600) for e in sample_chain(np.random.default_rng(s), 0.5, (1, 1),
                                                                   n_donors=1, weights=weights)]
        return {n: names.count(n) for n in EDIT_FAMILIES}

    uniform, weighted = counts(None), counts({"blur": 5.0, "jpeg": 0.0})
    # 600 single edits over 25 families: ~24 each uniformly; blur at 5x weight ~103 (5/29 of the draws)
    assert 10 <= uniform["blur"] <= 45 and weighted["blur"] >= 70
    assert uniform["jpeg"] > 0 and weighted["jpeg"] == 0
    # no weights and empty weights draw exactly what the sampler drew before weights existed
    assert all(sample_chain(np.random.default_rng(s), 0.7) == sample_chain(np.random.default_rng(s), 0.7, weights={})
               for s in range(20))


def test_parse_weights_and_bad_weights():
    assert parse_weights(["blur=2", " paste_onto = 3.5"]) == {"blur": 2.0, "paste_onto": 3.5}
    assert parse_weights([]) == {}
    for bad, message in [("blur", "FAMILY=WEIGHT"), ("blur=x", "FAMILY=WEIGHT"), ("blur=-1", ">= 0"),
                         ("sepia=2", "unknown edit family 'sepia'")]:
        with pytest.raises(ValueError, match=message):
            parse_weights([bad])
    with pytest.raises(ValueError, match="non-zero weight"):
        sample_chain(np.random.default_rng(0), families=["crop", "jpeg"], n_edits=(2, 2), weights={"jpeg": 0})


def test_chain_order_geometry_first_jpeg_last():
    for s in range(100):
        names = [e.name for e in sample_chain(np.random.default_rng(s), 0.5, (3, 3))]
        if "jpeg" in names:
            assert names[-1] == "jpeg"
        stages = [FAMILIES[n].stage for n in names]
        assert stages == sorted(stages)


def test_donor_edit_without_donors_raises(photos):
    for name in DONOR_FAMILIES:
        with pytest.raises(ValueError, match="donor"):
            apply_chain(photos[0], _single(name, 0.5, 0))


def _mean_param(name, intensity, fn, n=60):
    return np.mean([fn(_single(name, intensity, s)[0].params) for s in range(n)])


def test_intensity_scales_parameters():
    def at(name, intensity, key):
        return _mean_param(name, intensity, key if callable(key) else lambda p: p[key])

    crop_area = lambda p: (p["x2"] - p["x1"]) * (p["y2"] - p["y1"])  # noqa: E731
    assert at("crop", 1.0, crop_area) < 0.2 < 0.5 < at("crop", 0.0, crop_area)  # ~10% area at t=1
    assert at("jpeg", 1.0, "quality") < 16 < 40 < at("jpeg", 0.0, "quality")
    grows = [("blur", "radius"), ("noise", "var"), ("perspective", "sigma"), ("meme", "caption"),
             ("paste_over", "size"), ("rotate", lambda p: abs(p["degrees"]))]
    for name, key in grows:
        assert at(name, 1.0, key) > 1.5 * at(name, 0.0, key), name
    assert at("paste_onto", 1.0, "size") < 0.5 * at("paste_onto", 0.0, "size")  # pasted smaller


def test_intensity_visible_in_pixels(photos):
    image = photos[0]
    def pixels(i): return np.mean([np.prod(apply_chain(image, _single("crop", i, s)).size) for s in range(10)])
    assert pixels(1.0) < 0.25 * pixels(0.0)

    def sharpness(i, name):
        outs = [np.asarray(apply_chain(image, _single(name, i, s)).convert("L"), dtype=float) for s in range(5)]
        return np.mean([np.abs(np.diff(o, axis=1)).mean() for o in outs])
    assert sharpness(1.0, "blur") < sharpness(0.0, "blur")
    assert sharpness(1.0, "pixelize") < sharpness(0.0, "pixelize")


def test_chains_serialise_and_replay(photos, donors):
    for s in range(20):
        chain = sample_chain(np.random.default_rng(s), s / 19, (3, 3), n_donors=2)
        text = yaml.safe_dump([e.to_dict() for e in chain])
        replayed = [Edit.from_dict(d) for d in yaml.safe_load(text)]
        assert replayed == chain
    out = apply_chain(photos[2], chain, donors)
    assert apply_chain(photos[2], replayed, donors).tobytes() == out.tobytes()


@pytest.mark.parametrize("name", EDIT_FAMILIES)
def test_tiny_input(name, donors):
    tiny = Image.new("RGB", (1, 1), (200, 30, 30))
    out = apply_chain(tiny, _single(name, 1.0, 0), donors)
    assert out.mode == "RGB" and 32 <= min(out.size) and max(out.size) <= 64


def test_huge_and_odd_inputs(photos, donors):
    huge = photos[1].resize((3000, 2000))
    for s in range(3):
        out, names = make_query(huge, s, 1.0, donors=donors, n_edits=(3, 3))
        assert out.mode == "RGB" and min(out.size) >= 32 and max(out.size) <= 6000, names
    for odd in [photos[0].convert("L"), photos[0].convert("RGBA"), photos[0].resize((3, 700))]:
        out, _ = make_query(odd, 1, 0.5, donors=donors)
        assert out.mode == "RGB" and min(out.size) >= 32 and max(out.size) <= 2 * max(odd.size)


def test_noise_leaves_global_numpy_rng_alone(photos):
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    apply_chain(photos[0], _single("noise", 0.5, 0))
    assert np.random.random() == expected


@pytest.mark.parametrize("name", TRANSFORM_FAMILIES)
def test_albumentations_transforms_construct_cleanly(name):
    for s in range(10):
        for intensity in (0.0, 0.5, 1.0):
            params = _single(name, intensity, s)[0].params
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                transform = FAMILIES[name].transform(params)
            assert isinstance(transform, A.BasicTransform) and transform.p == 1.0


def test_albu_helper_rejects_wrong_argument_names():
    with pytest.raises(ValueError, match="threshold"):
        albu(A.Solarize, threshold=0.5)  # albumentations 1.x name; 2.x only warns without strict
    with pytest.raises(TypeError):
        albu(A.RandomRotate90, factor=1)  # plain __init__ (no InitSchema)
    assert set(TRANSFORM_FAMILIES) >= {"rot90", "shear", "invert", "solarize", "posterize",
                                       "color_jitter", "channel_shuffle"}


@pytest.mark.parametrize("seed_", [489, 895])  # AugLy: "Cannot crop out black border"; a 105x3 sliver
def test_perspective_crop_never_leaves_a_sliver(seed_):
    image = Image.new("RGB", (120, 90), (100, 50, 20))
    out = FAMILIES["perspective"].apply(image, {"sigma": 0.22, "seed": seed_, "crop_black_border": True})
    assert out.size == (120, 90)  # the uncropped warp, not an error or a strip later edits divide by
    kept = FAMILIES["perspective"].apply(image, {"sigma": 0.05, "seed": 0, "crop_black_border": True})
    assert 30 <= min(kept.size) and kept.size != (120, 90)  # a mild warp is still cropped
