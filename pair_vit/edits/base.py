"""Shared plumbing for the edit families: the family record, intensity scaling, albumentations helpers.

Every family is a pair of plain functions:

* ``sample(rng, t) -> dict``: draws the edit's parameters for intensity ``t`` in [0, 1]. Values are
  plain python (int/float/str/bool/list/dict) so a chain can be logged to YAML/JSON and replayed.
  Sizes are stored relative to the image (fractions), so one chain fits images of any size.
* ``apply(image, params) -> image`` (or ``apply(image, params, donors)`` for donor families):
  a pure function of its inputs; any randomness inside AugLy/albumentations is seeded from params.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# Stages order the edits of a chain: geometry first, overlays after colour changes (so a caption
# keeps its colours), then degradations, and JPEG last, as a re-upload would.
GEOMETRY, COLOR, OVERLAY, DEGRADE, ENCODE = range(5)


@dataclass(frozen=True)
class Family:
    """One edit family: how to sample its parameters and how to apply them."""

    name: str
    stage: int
    sample: Callable[[np.random.Generator, float], dict]
    apply: Callable[..., Image.Image]
    needs_donor: bool = False
    # Builds the albumentations transform from params (None for AugLy/PIL families); exposed so
    # tests can check every transform constructs with valid argument names.
    transform: Optional[Callable[[dict], A.BasicTransform]] = None


def span(rng: np.random.Generator, t: float, at0: tuple[float, float], at1: tuple[float, float],
         ndigits: int = 4) -> float:
    """Uniform draw from a range that slides from ``at0`` (intensity 0) to ``at1`` (intensity 1)."""
    lo = at0[0] + (at1[0] - at0[0]) * t
    hi = at0[1] + (at1[1] - at0[1]) * t
    # Rounded so logged chains stay readable; plain float so they stay YAML-serialisable.
    return round(float(rng.uniform(lo, hi)), ndigits)


def sign(rng: np.random.Generator) -> int:
    """Random +1 / -1."""
    return 1 if rng.random() < 0.5 else -1


def seed(rng: np.random.Generator) -> int:
    """An int seed, stored in params, for library internals that draw random numbers."""
    return int(rng.integers(0, 2**31 - 1))


def color(rng: np.random.Generator) -> list[int]:
    """A random RGB colour as a list of ints (lists serialise cleanly, tuples do not in YAML)."""
    return [int(c) for c in rng.integers(0, 256, size=3)]


def choice(rng: np.random.Generator, options) -> object:
    """Pick one of ``options`` as a plain python value."""
    return options[int(rng.integers(len(options)))]


def albu(cls: type, **kwargs) -> A.BasicTransform:
    """Construct an albumentations transform that always fires, rejecting unknown argument names.

    albumentations 2.x only *warns* about arguments it does not know (e.g. 1.x names), which would
    silently turn an edit into a no-op; ``strict=True`` makes that an error instead.
    """
    # albumentations only wraps __init__ (adding `strict`) for classes that declare an InitSchema;
    # the others (e.g. RandomRotate90) have a plain __init__ that already rejects unknown names.
    strict = {"strict": True} if "InitSchema" in vars(cls) else {}
    with warnings.catch_warnings():
        # Belt and braces: any construction warning (deprecated/ignored argument) is an error too.
        warnings.simplefilter("error")
        return cls(p=1.0, **strict, **kwargs)


def run_albu(transform: A.BasicTransform, image: Image.Image, seed_value: int = 0) -> Image.Image:
    """Apply an albumentations transform to a PIL image, seeding its internal RNG for determinism."""
    transform.set_random_seed(seed_value)
    out = transform(image=np.asarray(image.convert("RGB")))["image"]
    return Image.fromarray(np.ascontiguousarray(out))


def to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 HxWx3 array of a PIL image."""
    return np.asarray(image.convert("RGB"))


def fit_size(image: Image.Image, min_side: int, max_side: int) -> Image.Image:
    """RGB copy of ``image`` rescaled (aspect kept) so both sides lie in [min_side, max_side].

    When the aspect ratio is too extreme for both bounds, each side is clamped (distorting it):
    a 1x1000 sliver becomes usable instead of 32x32000.
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = max(min(1.0, max_side / max(w, h)), min_side / min(w, h))
    size = tuple(int(min(max(round(s * scale), min_side), max_side)) for s in (w, h))
    if size == (w, h):
        return image
    return image.resize(size, Image.BICUBIC if scale > 1 else Image.LANCZOS)
