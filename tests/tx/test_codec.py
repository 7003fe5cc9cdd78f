"""The pair-vit signal string (pair_vit/tx/codec.py): compact, whitespace-free, bound to the weights."""
from __future__ import annotations

import numpy as np
import pytest

from pair_vit.tx import codec

FP = "0123456789abcdef01234567"


def unit_vectors(n: int, dim: int = 256, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("views", [1, 5])
def test_round_trip_is_compact_and_keeps_cosines(views):
    vectors = unit_vectors(views)
    signal = codec.encode(vectors, FP)
    assert signal.startswith("pv1.01234567.") and " " not in signal
    assert len(signal) == codec.n_chars(views, 256) == 13 + -(-views * 512 * 4 // 3)
    back = codec.decode(signal, FP, 256)
    assert back.shape == (views, 256)
    # float16 keeps every cosine within 1e-3
    assert np.abs(back @ back.T - vectors @ vectors.T).max() < 1e-3
    assert np.array_equal(codec.decode(f"  {signal}\n", FP, 256), back)


@pytest.mark.parametrize("bad, reason", [
    ("", "not a pair-vit signal"),
    ("f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22", "not a pair-vit signal"),
    ("pv1.01234567.abc def", "not a pair-vit signal"),
    ("pv2.01234567.AAAA", "format 'pv2' is not supported"),
    ("pv1.01234567.A", "not base64"),
])
def test_malformed_signals_are_refused(bad, reason):
    with pytest.raises(codec.SignalError, match=reason):
        codec.decode(bad, FP, 256)


def test_truncated_signal_is_refused():
    signal = codec.encode(unit_vectors(1), FP)
    with pytest.raises(codec.SignalError, match="truncated"):
        codec.decode(signal[:-40], FP, 256)


def test_other_weights_are_refused():
    signal = codec.encode(unit_vectors(1), "fedcba9876543210")
    with pytest.raises(codec.SignalError, match="other descriptor weights \\(fedcba98\\)"):
        codec.decode(signal, FP, 256)


def test_vectors_that_are_not_unit_are_refused():
    with pytest.raises(codec.SignalError, match="not unit vectors"):
        codec.decode(codec.encode(unit_vectors(1) * 3, FP), FP, 256)
    nan = unit_vectors(1)
    nan[0, 0] = np.nan
    with pytest.raises(codec.SignalError, match="not unit vectors"):
        codec.decode(codec.encode(nan, FP), FP, 256)
