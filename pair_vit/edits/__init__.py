"""Copy-edit battery (AugLy + albumentations) that synthesises ISC2021/DISC21-style queries.

    chain = sample_chain(rng, intensity=0.7, n_donors=len(donors))   # pure sampling
    query = apply_chain(photo, chain, donors)                          # deterministic
    query, names = make_query(photo, rng, intensity=0.7, donors=donors)

Importing this package applies :mod:`pair_vit.edits.augly_compat` (AugLy 1.0.0 vs current
Pillow/numpy) before any edit can run.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check (no network) on import

from . import augly_compat  # noqa: E402

augly_compat.apply()

from .battery import (  # noqa: E402
    DONOR_FAMILIES,
    EDIT_FAMILIES,
    Edit,
    apply_chain,
    make_query,
    parse_weights,
    sample_chain,
)

__all__ = ["EDIT_FAMILIES", "DONOR_FAMILIES", "Edit", "sample_chain", "apply_chain", "make_query", "parse_weights"]
