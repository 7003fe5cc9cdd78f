"""Image bytes -> pair-vit signal string, with the shipped descriptor (loaded once per process).

    signal = hash_bytes(open("photo.jpg", "rb").read())    # "pv1.3f0f7d14.<base64>", or "" if unreadable

The image is decoded by `pair_vit.data.load_image_bytes` (every way a file can be unusable becomes one short
reason), cut into the views of `TxCalibration.views` by `pair_vit.descriptor.views.crop_views` and embedded by
`pair_vit.descriptor.embed` in float32: signals are shared between organisations and machines, so they must not
depend on whether the CPU that made them computes bf16 natively.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from functools import lru_cache
from typing import Iterator

import numpy as np

from pair_vit import data
from pair_vit.tx import codec
from pair_vit.tx.calibration import TxCalibration

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


_OVERRIDE: list[TxCalibration] = []


def settings() -> TxCalibration:
    """The signal type's settings: tx_calibration.json next to the shipped weights (read once), or those of an
    enclosing `use(...)` block."""
    return _OVERRIDE[-1] if _OVERRIDE else _shipped_settings()


@lru_cache(maxsize=1)
def _shipped_settings() -> TxCalibration:
    return TxCalibration.read()


@contextlib.contextmanager
def use(cfg: TxCalibration) -> Iterator[TxCalibration]:
    """Hash, decode and index with `cfg` instead of the shipped settings inside the block (the benchmark's
    candidate views and the calibration being fitted; tests' other weights)."""
    _OVERRIDE.append(cfg)
    try:
        yield cfg
    finally:
        _OVERRIDE.pop()


def expected_fingerprint() -> str:
    return settings().fingerprint


@lru_cache(maxsize=1)
def _model():
    from pair_vit.descriptor import SHIPPED_WEIGHTS, load_descriptor
    from pair_vit.descriptor.views import model_fingerprint

    model, _ = load_descriptor(SHIPPED_WEIGHTS)
    found = model_fingerprint(model)
    if found != expected_fingerprint():
        # The calibration and every signal in circulation belong to the weights they were made with.
        raise ValueError(f"{SHIPPED_WEIGHTS} has fingerprint {found}, but the pair-vit signal type is calibrated "
                         f"for {expected_fingerprint()}: re-run scripts/bench_tx.py --write-calibration")
    return model


def embed_bytes(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Image file content -> (V, D) float32 unit vectors, V views (the whole image first); raises
    data.ImageLoadError (with a short reason) if the content is not a usable image."""
    from pair_vit.descriptor import embed
    from pair_vit.descriptor.views import DECODE_SCALE, crop_views

    cfg = settings()
    with _LOCK:  # one model per process; torch inference is not re-entrant across threads on it
        model = _model()
        image = data.load_image_bytes(content, name, max_side=DECODE_SCALE[cfg.views] * model.image_size)
        return embed(model, crop_views(image, cfg.views), amp=False)


def hash_bytes(content: bytes, name: str = "<bytes>") -> str:
    """Image file content -> signal string; "" (ThreatExchange's convention for "no hash") if the image cannot
    be used, with the reason logged as a warning."""
    try:
        vectors = embed_bytes(content, name)
    except data.ImageLoadError as err:
        log.warning("pair_vit: no signal for %s: %s", name, err.reason)
        return ""
    return codec.encode(vectors, expected_fingerprint())


def decode(signal: str) -> np.ndarray:
    """Signal string -> (V, D) float32 vectors; codec.SignalError if malformed, truncated, of other weights or
    of another views setting (their similarities would not mean what the calibration says)."""
    from pair_vit.descriptor.views import VIEW_BOXES, n_views

    cfg = settings()
    vectors = codec.decode(signal, cfg.fingerprint, cfg.dim)
    fewest = len(VIEW_BOXES.get(cfg.views, VIEW_BOXES["halves"]))  # "regions": the halves + 0..6 proposals
    if not fewest <= len(vectors) <= n_views(cfg.views):
        raise codec.SignalError(f"pair-vit signal of {len(vectors)} views, but this signal type packs the "
                                f"{cfg.views!r} views ({fewest}..{n_views(cfg.views)}): re-hash with these settings")
    return vectors
