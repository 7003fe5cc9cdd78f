"""Fixtures of the service tests: demo photos, edited copies, a small saved collection, odd uploads."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

import pair_vit
from pair_vit import data

DEMO = Path(str(pair_vit.demo_dir()))
FAST = {"num_workers": 0}  # no decoding worker processes for a handful of images


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """4 clothing photos, chelsea and rocket (the collection), then china (never in it)."""
    return (sorted(data.list_images(DEMO / "clothing_cc0").values())[:4]
            + [DEMO / "skimage" / "chelsea.jpg", DEMO / "skimage" / "rocket.jpg", DEMO / "sklearn" / "china.jpg"])


@pytest.fixture(scope="session")
def saved(photos, tmp_path_factory) -> Path:
    """The first 6 photos as a saved collection, built once per session."""
    from pair_vit.match.detector import CopyDetector

    detector = CopyDetector(**FAST)
    detector.add(photos[:6])
    return detector.save(tmp_path_factory.mktemp("serve") / "collection")


@pytest.fixture()
def collection(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "collection"))


@pytest.fixture(scope="session")
def cat_bytes(photos) -> bytes:
    """An edited copy of chelsea as JPEG bytes: cropped, resized, re-encoded."""
    buffer = io.BytesIO()
    Image.open(photos[4]).crop((90, 0, 300, 210)).resize((160, 160)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
