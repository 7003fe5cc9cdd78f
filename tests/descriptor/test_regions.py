"""Region proposals: collage cells and pasted photos come back as boxes; plain photos give none."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pair_vit.descriptor import regions
from pair_vit.descriptor.views import crop_views, n_views, view_boxes


def smooth_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like image without straight edges: coarse colour noise, bilinearly upsampled."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def collage(rows: int, cols: int, cell=(90, 60), gap: int = 4) -> Image.Image:
    w, h = cell
    canvas = Image.new("RGB", (cols * w + (cols + 1) * gap, rows * h + (rows + 1) * gap), (230, 120, 20))
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        canvas.paste(smooth_photo(w, h, seed=i), (gap + c * (w + gap), gap + r * (h + gap)))
    return canvas


def near(box, expected, tol=0.03) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box, expected))


@pytest.mark.parametrize("rows,cols,gap", [(2, 2, 4), (3, 2, 0), (1, 3, 6)])
def test_every_collage_cell_is_proposed(rows, cols, gap):
    image = collage(rows, cols, gap=gap)
    boxes = regions.propose(image)
    W, H = image.size
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * (90 + gap), gap + r * (60 + gap)
        cell = (x0 / W, y0 / H, (x0 + 90) / W, (y0 + 60) / H)
        assert any(near(b, cell) for b in boxes), (i, cell, boxes)
    assert len(boxes) <= regions.ProposalConfig.max_boxes


def test_a_photo_pasted_onto_another_is_proposed():
    # a dark scene with a bright photo on it: the paste's border is an edge all round
    background = Image.eval(smooth_photo(300, 200, seed=7), lambda v: v // 3)
    background.paste(Image.eval(smooth_photo(90, 70, seed=8), lambda v: 128 + v // 2), (150, 40))
    boxes = regions.propose(background)
    assert boxes and near(boxes[0], (0.5, 0.2, 0.8, 0.55))


def test_plain_or_tiny_images_have_no_proposals():
    assert regions.propose(smooth_photo(300, 200, seed=1)) == []
    assert regions.propose(Image.new("RGB", (3, 2))) == []
    assert regions.propose(Image.new("L", (200, 100), 128)) == []


def test_boxes_are_fractions_inside_the_image_and_not_too_large():
    cfg = regions.ProposalConfig()
    for box in regions.propose(collage(3, 3)):
        left, top, right, bottom = box
        assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
        assert (right - left) * (bottom - top) <= cfg.max_area


def test_regions_views_are_halves_plus_proposals():
    image = collage(2, 2)
    views = crop_views(image, "regions")
    assert n_views("regions") == n_views("halves") + regions.ProposalConfig.max_boxes
    assert len(views) == n_views("halves") + len(regions.propose(image))
    assert views[0] is image
    assert view_boxes(*image.size, "regions") == view_boxes(*image.size, "halves")
    assert len(crop_views(smooth_photo(120, 80, seed=3), "regions")) == n_views("halves")
