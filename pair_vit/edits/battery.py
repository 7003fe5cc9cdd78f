"""The copy-edit battery: sample a chain of edits, apply it to an image, make a query.

A *chain* is a list of :class:`Edit` (family name + fully sampled parameters). Sampling needs no
image, so one chain can be applied to several images (e.g. a group of look-alike photos during
training) and stored as YAML/JSON next to a benchmark to reproduce it. Applying is deterministic.

Intensity ``t`` in [0, 1] is the curriculum knob: 0 gives mild but visible edits, 1 the hardest
ones (crops down to ~10% of the area, JPEG quality ~10, heavy blur, big overlays...).
The family implementations live in ``geometry.py``, ``pixels.py`` and ``overlays.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from . import geometry, overlays, pixels
from .base import Family, fit_size

EDIT_FAMILIES: tuple[str, ...] = (
    "crop", "flip", "rot90", "rotate", "shear", "perspective", "overlay_text", "overlay_emoji",
    "meme", "screenshot", "paste_onto", "paste_over", "collage", "pad_square", "pixelize", "blur",
    "noise", "jpeg", "grayscale", "invert", "solarize", "posterize", "color_jitter",
    "channel_shuffle", "opacity",
)
FAMILIES: dict[str, Family] = {f.name: f for f in geometry.FAMILIES + pixels.FAMILIES + overlays.FAMILIES}
assert set(FAMILIES) == set(EDIT_FAMILIES), "EDIT_FAMILIES and the implemented families disagree"
DONOR_FAMILIES: tuple[str, ...] = tuple(n for n in EDIT_FAMILIES if FAMILIES[n].needs_donor)

MIN_SIDE = 32  # outputs are at least this big on both sides (tiny inputs are upscaled)


@dataclass(frozen=True)
class Edit:
    """One sampled edit. ``params`` holds plain python values only (YAML/JSON-serialisable);
    donor families reference their second photo by ``params["donor"]``, an index into ``donors``."""

    name: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> "Edit":
        return cls(name=d["name"], params=dict(d.get("params", {})))


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown edit family {name!r}; valid families: {', '.join(EDIT_FAMILIES)}")
    return FAMILIES[name]


def _candidates(families: Sequence[str] | None, n_donors: int) -> list[str]:
    """Families to draw from, in EDIT_FAMILIES order, minus donor families when there are no donors."""
    if isinstance(families, str):  # a lone name would otherwise be iterated letter by letter
        families = [families]
    names = list(EDIT_FAMILIES) if families is None else list(dict.fromkeys(families))
    for name in names:
        _family(name)
    names = [n for n in names if n_donors > 0 or not FAMILIES[n].needs_donor]
    if not names:
        raise ValueError(f"no edit family left to sample from {families!r} with n_donors={n_donors} "
                         f"(donor families {DONOR_FAMILIES} need n_donors > 0)")
    return names


def sample_chain(rng: np.random.Generator, intensity: float = 0.5, n_edits: tuple[int, int] = (1, 3),
                 families: Sequence[str] | None = None, n_donors: int = 0,
                 weights: Mapping[str, float] | None = None) -> list[Edit]:
    """Sample a chain of ``n_edits[0]..n_edits[1]`` (inclusive) edits of distinct families.

    ``families`` restricts the pool (default: all); donor families are dropped when ``n_donors`` is 0.
    ``weights`` makes some families likelier than others (family -> relative weight, 1 where absent;
    None or empty: uniform, the same draws as before weights existed). The count is capped at the
    pool size. Edits come out ordered by stage (geometry, colour, overlays, degradations, JPEG), in
    random order within a stage.
    """
    rng = np.random.default_rng(rng)  # passes a Generator through unchanged, accepts an int seed
    if not 0.0 <= float(intensity) <= 1.0:
        raise ValueError(f"intensity must be in [0, 1], got {intensity!r}")
    lo, hi = (int(v) for v in n_edits)
    if not 1 <= lo <= hi:
        raise ValueError(f"n_edits must be (lo, hi) with 1 <= lo <= hi, got {n_edits!r}")
    names = _candidates(families, n_donors)
    count = min(int(rng.integers(lo, hi + 1)), len(names))
    picked = [names[i] for i in _draw(rng, names, count, weights)]
    chain = [_sample_edit(rng, name, float(intensity), n_donors) for name in picked]
    return sorted(chain, key=lambda e: FAMILIES[e.name].stage)  # stable sort keeps the random order


def _draw(rng: np.random.Generator, names: list[str], count: int, weights: Mapping[str, float] | None):
    """Indices of ``count`` distinct families, uniformly or by ``weights``."""
    if not weights:
        return rng.permutation(len(names))[:count]
    _check_weights(weights)
    p = np.array([float(weights.get(n, 1.0)) for n in names])
    if np.count_nonzero(p) < count:
        raise ValueError(f"only {np.count_nonzero(p)} families have a non-zero weight; a chain needs {count}")
    return rng.choice(len(names), size=count, replace=False, p=p / p.sum())


def parse_weights(items: Sequence[str]) -> dict[str, float]:
    """``["blur=2", "paste_onto=3"]`` -> ``{"blur": 2.0, "paste_onto": 3.0}`` (command-line / YAML form)."""
    out: dict[str, float] = {}
    for item in items:
        name, _, value = str(item).partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"edit weight {item!r}: expected FAMILY=WEIGHT, e.g. blur=2") from None
        out[name.strip()] = weight
    return _check_weights(out)


def _check_weights(weights: Mapping[str, float]) -> Mapping[str, float]:
    for name, weight in weights.items():
        _family(name)
        if not weight >= 0:
            raise ValueError(f"edit weight {name}={weight!r}: the weight must be >= 0")
    return weights


def _sample_edit(rng: np.random.Generator, name: str, t: float, n_donors: int) -> Edit:
    family = FAMILIES[name]
    params = family.sample(rng, t)
    if family.needs_donor:
        params["donor"] = int(rng.integers(n_donors))
    return Edit(name, params)


def apply_chain(image: Image.Image, chain: Sequence[Edit], donors: Sequence[Image.Image] = ()) -> Image.Image:
    """Apply ``chain`` in order and return an RGB image; same inputs give byte-identical output.

    The result (and every intermediate) has both sides >= 32 px and no side longer than
    max(2x the input's longest side, 64 px): tiny inputs are upscaled, big frames scaled down.
    """
    donors = list(donors)
    for edit in chain:
        if _family(edit.name).needs_donor and not donors:
            raise ValueError(f"edit {edit.name!r} needs donor images but no donors were given "
                             f"(pass donors=[...] or exclude {DONOR_FAMILIES})")
    max_side = max(2 * max(image.size), 2 * MIN_SIDE)
    out = fit_size(image, MIN_SIDE, max_side)
    for edit in chain:
        family = FAMILIES[edit.name]
        out = family.apply(out, edit.params, donors) if family.needs_donor else family.apply(out, edit.params)
        out = fit_size(out, MIN_SIDE, max_side)
    return out


def make_query(image: Image.Image, rng: np.random.Generator | int, intensity: float = 0.5, donors=(),
               n_edits: tuple[int, int] = (1, 3), families: Sequence[str] | None = None,
               weights: Mapping[str, float] | None = None) -> tuple[Image.Image, list[str]]:
    """Sample a chain (donor families only if ``donors`` is non-empty), apply it to ``image``.

    Returns the edited RGB image and the names of the families applied, in order.
    """
    chain = sample_chain(np.random.default_rng(rng), intensity, n_edits, families, n_donors=len(donors),
                         weights=weights)
    return apply_chain(image, chain, donors), [e.name for e in chain]
