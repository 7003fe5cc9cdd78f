"""PairVitSignal (pair_vit/tx/signal.py) with the shipped descriptor and calibration: hashing, comparing,
validating, bad input."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from threatexchange.extensions.manifest import ThreatExchangeExtensionManifest

from pair_vit import demo_dir
from pair_vit.tx import TX_MANIFEST, PairVitSignal, codec, hasher
from pair_vit.tx.signal import default_threshold, probability

PHOTOS = Path(str(demo_dir())) / "skimage"


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def chelsea() -> str:
    return PairVitSignal.hash_from_file(PHOTOS / "chelsea.jpg")


def test_manifest_names_the_signal_type():
    assert ThreatExchangeExtensionManifest.load_from_module_name("pair_vit.tx") is TX_MANIFEST
    assert TX_MANIFEST.signal_types == (PairVitSignal,) and PairVitSignal.get_name() == "pair_vit"
    for example in PairVitSignal.get_examples():
        assert PairVitSignal.validate_signal_str(example) == example


def test_hash_is_compact_and_matches_edited_copies_only(chelsea):
    cfg = hasher.settings()
    assert PairVitSignal.validate_signal_str(f" {chelsea}\n") == chelsea
    assert len(chelsea) == codec.n_chars(len(hasher.decode(chelsea)), cfg.dim) and " " not in chelsea
    cat = Image.open(PHOTOS / "chelsea.jpg")
    copy = PairVitSignal.hash_from_bytes(jpeg(ImageOps.autocontrast(cat.crop((30, 0, 300, 280)))))
    other = PairVitSignal.hash_from_file(PHOTOS / "rocket.jpg")
    same = PairVitSignal.compare_hash(chelsea, chelsea)
    assert same.match and same.distance.distance < 1e-3
    found = PairVitSignal.compare_hash(chelsea, copy)
    assert found.match and found.distance.distance <= default_threshold()
    assert not PairVitSignal.compare_hash(chelsea, other).match
    assert PairVitSignal.compare_hash(chelsea, other, distance_threshold=2.0).match  # a configurable cut


def test_probability_falls_with_distance_and_is_the_p90_cut_at_the_threshold():
    cfg = hasher.settings()
    p = [probability(d) for d in (0.0, default_threshold(), 1.0)]
    assert p[0] > p[1] > p[2] and p[1] == pytest.approx(cfg.calibration["threshold_p90"], abs=1e-6)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"not an image at all", "not an image"),
    (jpeg(Image.new("RGB", (64, 64), "red"))[:200], "truncated"),
])
def test_unreadable_image_gives_an_empty_hash_and_logs_why(content, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="pair_vit.tx.hasher"):
        assert PairVitSignal.hash_from_bytes(content) == ""
    assert f"no signal for <bytes>: {reason}" in caplog.text


def test_missing_file_gives_an_empty_hash(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert PairVitSignal.hash_from_file(tmp_path / "gone.jpg") == ""
    assert "gone.jpg: cannot read file" in caplog.text


def test_validate_refuses_malformed_truncated_and_other_weights(chelsea):
    pdq = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
    vectors = hasher.decode(chelsea)
    cases = {pdq: "not a pair-vit signal", chelsea[:-20]: "truncated",
             codec.encode(vectors, "0" * 24): "other descriptor weights",
             codec.encode(np.flip(vectors, 1) * 2, hasher.settings().fingerprint): "not unit vectors"}
    for signal, reason in cases.items():
        with pytest.raises(ValueError, match=reason):
            PairVitSignal.validate_signal_str(signal)
