"""The pair-vit signal string: descriptor vectors as compact text that ThreatExchange and HMA can carry.

    pv1.3f0f7d14.<URL-safe base64 of V x D float16, no padding>

`pv1` is the format version, `3f0f7d14` the first 8 hex digits of the descriptor's weights fingerprint
(`pair_vit.descriptor.views.model_fingerprint`): a signal is only comparable with signals of the same weights,
so a signal made by other weights is refused by `decode` instead of matching at random. The payload holds V
unit vectors of D dimensions (V views of one image, the whole image first; D = 256 for the shipped
descriptor), little-endian float16: 512 bytes and 692 characters per view. There is no whitespace anywhere:
the CLI and HMA split signal files on spaces.

This module only knows the format (numpy, no torch), so validating a signal never loads the model.
"""
from __future__ import annotations

import base64
import binascii
import re

import numpy as np

VERSION = "pv1"
FINGERPRINT_CHARS = 8
# float16 keeps cosine similarities within ~1e-3 of float32 (measured by tests/tx/test_codec.py) at half
# the size; the faiss index stores the same float16 values, so nothing is lost twice.
DTYPE = np.dtype("<f2")
# A unit vector stored in float16 has a norm within this of 1; anything further was not made by `encode`.
NORM_TOLERANCE = 0.02
MAX_VIEWS = 16

_SIGNAL = re.compile(r"^([a-z]+\d+)\.([0-9a-f]+)\.([A-Za-z0-9_-]+)$")


class SignalError(ValueError):
    """A string that is not a valid pair-vit signal for these weights; the message says why."""


def encode(vectors: np.ndarray, fingerprint: str) -> str:
    """(V, D) unit vectors (V views of one image, the whole image first) -> signal string."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not 1 <= len(vectors) <= MAX_VIEWS:
        raise ValueError(f"encode: expected (V, D) vectors with 1 <= V <= {MAX_VIEWS}, got {vectors.shape}")
    payload = base64.urlsafe_b64encode(vectors.astype(DTYPE).tobytes()).rstrip(b"=").decode("ascii")
    return f"{VERSION}.{fingerprint[:FINGERPRINT_CHARS]}.{payload}"


def decode(signal: str, fingerprint: str, dim: int) -> np.ndarray:
    """Signal string -> (V, dim) float32 vectors; raises SignalError if malformed, truncated or made by weights
    other than those of `fingerprint`."""
    match = _SIGNAL.match(signal.strip()) if isinstance(signal, str) else None
    if match is None:
        raise SignalError(f"not a pair-vit signal (expected '{VERSION}.<weights>.<base64>'): {_shorten(signal)}")
    version, weights, payload = match.groups()
    if version != VERSION:
        raise SignalError(f"pair-vit signal format {version!r} is not supported (this version reads {VERSION!r})")
    if weights != fingerprint[:FINGERPRINT_CHARS]:
        raise SignalError(f"pair-vit signal made by other descriptor weights ({weights}); these weights are "
                          f"{fingerprint[:FINGERPRINT_CHARS]}: re-hash the images with the same weights")
    raw = _b64decode(payload)
    view_bytes = dim * DTYPE.itemsize
    if len(raw) == 0 or len(raw) % view_bytes or len(raw) // view_bytes > MAX_VIEWS:
        raise SignalError(f"pair-vit signal truncated or padded: {len(raw)} bytes is not 1..{MAX_VIEWS} views of "
                          f"{view_bytes} bytes")
    vectors = np.frombuffer(raw, dtype=DTYPE).astype(np.float32).reshape(-1, dim)
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
        raise SignalError("pair-vit signal corrupt: its vectors are not unit vectors")
    return vectors


def n_chars(views: int, dim: int) -> int:
    """Length of a signal of `views` views of `dim` dimensions."""
    return len(VERSION) + FINGERPRINT_CHARS + 2 + -(-views * dim * DTYPE.itemsize * 4 // 3)


def _b64decode(payload: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        raise SignalError(f"pair-vit signal corrupt: its payload is not base64 ({len(payload)} characters)") from None


def _shorten(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
