"""Fixtures of the ThreatExchange extension tests: settings without the model, signals of random vectors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pair_vit.tx import codec, hasher
from pair_vit.tx.calibration import TxCalibration

FP = "0123456789abcdef01234567"


@pytest.fixture
def settings():
    """Synthetic settings (no model needed): 256-d, threshold distance 0.2, active inside the test."""
    cfg = TxCalibration(fingerprint=FP, dim=256, views="full", query_penalty=0.05, reference_penalty=0.1,
                        calibration={"w_logit": 20.0, "bias": -16.0}, similarity_p90=0.8)
    with hasher.use(cfg):
        yield cfg


def other_weights(cfg: TxCalibration) -> TxCalibration:
    return dataclasses.replace(cfg, fingerprint="fedcba9876543210fedcba98")


def signals(n: int, views: int = 1, seed: int = 0, fingerprint: str = FP) -> list[str]:
    """`n` signals of random unit vectors (`views` views each)."""
    v = np.random.default_rng(seed).standard_normal((n, views, 256)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    return [codec.encode(x, fingerprint) for x in v]


def near(signal: str, cosine: float, seed: int = 1) -> str:
    """A signal whose whole-image view has cosine `cosine` with `signal`'s."""
    v = codec.decode(signal, FP, 256)[0]
    noise = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    noise -= (noise @ v) * v
    noise /= np.linalg.norm(noise)
    return codec.encode((cosine * v + np.sqrt(1 - cosine ** 2) * noise)[None], FP)
