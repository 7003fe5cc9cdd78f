"""Geometric edit families: crop, flip, rot90, rotate, shear, perspective, pad_square.

Intensity ``t`` in [0, 1] widens the geometric change (smaller crops, larger angles, more padding).
"""
from __future__ import annotations

import functools
import math
import warnings

import albumentations as A
import augly.image as imaugs
import cv2
import numpy as np
from PIL import Image

from .base import GEOMETRY, Family, albu, color, run_albu, seed, sign, span, to_array


def sample_crop(rng: np.random.Generator, t: float) -> dict:
    """Crop box as image fractions; kept area ~50-85% at t=0 down to ~7-15% at t=1."""
    area = span(rng, t, (0.5, 0.85), (0.07, 0.15))
    aspect = math.exp(rng.uniform(-0.5, 0.5))  # crop aspect relative to the image's
    w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return {k: round(float(v), 4) for k, v in
            {"x1": x1, "y1": y1, "x2": min(1.0, x1 + w), "y2": min(1.0, y1 + h)}.items()}


def apply_crop(image: Image.Image, p: dict) -> Image.Image:
    return imaugs.crop(image, x1=p["x1"], y1=p["y1"], x2=p["x2"], y2=p["y2"])


def sample_flip(rng: np.random.Generator, t: float) -> dict:
    """Mirror; vertical flips (rarer in the wild) get likelier with intensity."""
    return {"axis": "vertical" if rng.random() < 0.15 + 0.35 * t else "horizontal"}


def apply_flip(image: Image.Image, p: dict) -> Image.Image:
    return imaugs.vflip(image) if p["axis"] == "vertical" else imaugs.hflip(image)


def sample_rot90(rng: np.random.Generator, t: float) -> dict:
    """Quarter turns k in {1, 2, 3} (k=0 would be a no-op)."""
    return {"k": int(rng.integers(1, 4))}


def rot90_transform(p: dict) -> A.BasicTransform:
    return albu(A.RandomRotate90)


def apply_rot90(image: Image.Image, p: dict) -> Image.Image:
    # Call the transform's apply with an explicit factor: its own sampling could pick k=0.
    return Image.fromarray(np.ascontiguousarray(rot90_transform(p).apply(to_array(image), factor=p["k"])))


def sample_rotate(rng: np.random.Generator, t: float) -> dict:
    """Free rotation of 4-15 degrees at t=0 up to 25-60 at t=1, either direction."""
    return {"degrees": sign(rng) * span(rng, t, (4, 15), (25, 60), 2)}


def apply_rotate(image: Image.Image, p: dict) -> Image.Image:
    # AugLy crops the rotated image to its largest axis-aligned inner rectangle (no black corners).
    return imaugs.rotate(image, degrees=p["degrees"])


def sample_shear(rng: np.random.Generator, t: float) -> dict:
    """Shear angles in degrees; one axis mostly, both sometimes, on a black or coloured border."""
    main = sign(rng) * span(rng, t, (5, 12), (20, 40), 2)
    other = sign(rng) * span(rng, t, (0, 5), (0, 20), 2) if rng.random() < 0.3 else 0.0
    x, y = (main, other) if rng.random() < 0.5 else (other, main)
    return {"x": x, "y": y, "fill": [0, 0, 0] if rng.random() < 0.7 else color(rng)}


def shear_transform(p: dict) -> A.BasicTransform:
    # fit_output grows the canvas so the whole sheared image stays visible.
    return albu(A.Affine, shear={"x": (p["x"], p["x"]), "y": (p["y"], p["y"])}, fit_output=True,
                border_mode=cv2.BORDER_CONSTANT, fill=tuple(p["fill"]))


def apply_shear(image: Image.Image, p: dict) -> Image.Image:
    return run_albu(shear_transform(p), image)


def sample_perspective(rng: np.random.Generator, t: float) -> dict:
    """Corner jitter std as a fraction of the short side (AugLy's sigma is in pixels)."""
    return {"sigma": span(rng, t, (0.03, 0.07), (0.12, 0.22)), "seed": seed(rng),
            "crop_black_border": bool(rng.random() < 0.5)}


def apply_perspective(image: Image.Image, p: dict) -> Image.Image:
    """The warp keeps the image size; with `crop_black_border` it is cut to the rectangle inside the warped
    corners, unless that keeps under a quarter of either side (then the black border stays)."""
    sigma = p["sigma"] * min(image.size)
    with warnings.catch_warnings():
        # AugLy solves for the warp with np.matrix, which warns on every call; nothing to act on.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warp = functools.partial(imaugs.perspective_transform, image, sigma=sigma, seed=p["seed"])
        if p["crop_black_border"]:
            try:
                out = warp(crop_out_black_border=True)
            except Exception as err:  # AugLy raises a bare Exception when the corners cross
                if "Cannot crop out black border" not in str(err):
                    raise
            else:
                # A crossed-over warp can leave a sliver a few pixels wide (or 0 after rounding), which
                # later edits divide by.
                if out.width * 4 >= image.width and out.height * 4 >= image.height:
                    return out
        return warp(crop_out_black_border=False)


def sample_pad_square(rng: np.random.Generator, t: float) -> dict:
    """Border of 3-10% (t=0) to 20-50% (t=1) of each side, then padded to a square."""
    return {"pad": span(rng, t, (0.03, 0.1), (0.2, 0.5)),
            "color": [0, 0, 0] if rng.random() < 0.5 else color(rng)}


def apply_pad_square(image: Image.Image, p: dict) -> Image.Image:
    # The extra border keeps the edit visible on inputs that are already square.
    fill = tuple(p["color"])
    padded = imaugs.pad(image, w_factor=p["pad"], h_factor=p["pad"], color=fill)
    return imaugs.pad_square(padded, color=fill)


FAMILIES = [
    Family("crop", GEOMETRY, sample_crop, apply_crop),
    Family("flip", GEOMETRY, sample_flip, apply_flip),
    Family("rot90", GEOMETRY, sample_rot90, apply_rot90, transform=rot90_transform),
    Family("rotate", GEOMETRY, sample_rotate, apply_rotate),
    Family("shear", GEOMETRY, sample_shear, apply_shear, transform=shear_transform),
    Family("perspective", GEOMETRY, sample_perspective, apply_perspective),
    Family("pad_square", GEOMETRY, sample_pad_square, apply_pad_square),
]
