"""The AugLy 1.0.0 shim: the two broken functions work again, narrowly patched, idempotently."""
import numpy as np
import PIL.ImageFont
import pytest
from PIL import Image

import pair_vit
import pair_vit.edits  # noqa: F401  (importing applies the shim)
from pair_vit.edits import augly_compat

import augly.image as imaugs
import augly.image.functional as augly_functional
import augly.image.utils.utils as augly_img_utils
from augly.utils import MEME_DEFAULT_FONT


@pytest.fixture(scope="module")
def photo():
    return Image.open(pair_vit.demo_dir() / "skimage" / "chelsea.jpg").convert("RGB")


def test_applied_on_import_and_idempotent():
    assert augly_compat.is_applied()
    font_proxy, np_proxy = augly_functional.ImageFont, augly_img_utils.np
    augly_compat.apply()
    augly_compat.apply()
    assert augly_functional.ImageFont is font_proxy and augly_img_utils.np is np_proxy


def test_patch_is_narrow():
    # Only AugLy's module globals changed: Pillow and numpy themselves are untouched.
    assert not hasattr(PIL.ImageFont.FreeTypeFont, "getsize_multiline")
    assert not hasattr(np, "float")
    assert augly_img_utils.np.float is float
    assert augly_img_utils.np.matrix is np.matrix  # everything else forwarded to real numpy
    assert augly_functional.ImageFont.ImageFont is PIL.ImageFont.ImageFont


def test_unpatched_augly_still_fails(monkeypatch, photo):
    """Documents why the shim exists; if this starts failing, AugLy was fixed and the shim can go."""
    monkeypatch.setattr(augly_functional, "ImageFont", PIL.ImageFont)
    with pytest.raises(AttributeError, match="getsize_multiline"):
        imaugs.meme_format(photo, text="LOL")
    monkeypatch.setattr(augly_img_utils, "np", np)
    with pytest.raises(AttributeError, match="float"):
        imaugs.perspective_transform(photo, sigma=20.0, seed=1)


def test_meme_format_works(photo):
    meme = imaugs.meme_format(photo, text="LOL", caption_height=80)
    assert meme.size == (photo.width, photo.height + 80)
    bar = np.asarray(meme)[:80].astype(int)
    assert (bar == 255).all(axis=-1).mean() > 0.5  # mostly the white caption background
    assert (bar < 64).all(axis=-1).mean() > 0.02  # with black caption text on it
    # The photo sits unchanged under the bar.
    assert np.array_equal(np.asarray(meme)[80:], np.asarray(photo))


def test_legacy_font_sizes_are_consistent():
    font = augly_functional.ImageFont.truetype(MEME_DEFAULT_FONT, 40)
    w1, h1 = font.getsize_multiline("LOL")
    w2, h2 = font.getsize_multiline("LOL LOL\nLOL")
    assert 0 < w1 < w2 and 0 < h1 < h2
    assert font.getsize("LOL") == (w1, h1)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # AugLy's np.matrix use
def test_perspective_transform_works(photo):
    out = imaugs.perspective_transform(photo, sigma=25.0, seed=3)
    assert out.size == photo.size
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(photo, dtype=int)).mean()
    assert diff > 5
    again = imaugs.perspective_transform(photo, sigma=25.0, seed=3)
    assert np.array_equal(np.asarray(out), np.asarray(again))


def test_overlay_text_survives_strings_raqm_cannot_shape():
    """These glyphs make raqm fail ("raqm_layout() failed"); the edit falls back to the basic layout."""
    from pair_vit.edits import overlays

    p = {"text": [[7286, 8156, 3570, 5994, 2635, 6219, 1198, 5578, 3053],
                  [4235, 9948, 8076, 6921, 6097, 5901, 3034, 8001, 3419],
                  [6439, 6710, 4640, 4172, 5163, 168, 484, 1536, 7436]],
         "font": "PlayfairDisplay-Bold", "size": 0.2145, "color": [0, 0, 0], "opacity": 0.8816, "x": 0.1867,
         "y": 0.0987}
    image = Image.new("RGB", (160, 120), (90, 120, 150))
    out = overlays.apply_overlay_text(image, p)
    assert out.size == image.size and np.abs(np.asarray(out, float) - np.asarray(image, float)).max() > 50
    assert not augly_compat._basic_layout  # the fallback is scoped to the one call
