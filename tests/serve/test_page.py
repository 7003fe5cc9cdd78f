"""The review page in a real browser: headless Chromium (Debian's package) loads it at a phone's viewport,
chooses an edited copy of a reference, and shows it first and flagged, with correspondences drawn. Skipped where
/usr/bin/chromium is missing (`apt-get install -y chromium`)."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from pair_vit.serve.browser import CHROMIUM, review_screenshot
from pair_vit.serve.process import ServerProcess

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed")


def test_the_page_shows_the_copy_first(collection, tmp_path, cat_bytes):
    query = tmp_path / "cat.jpg"
    query.write_bytes(cat_bytes)
    with ServerProcess(collection, ["--num-workers", "0", "--log-level", "warning"]) as server:
        shown = review_screenshot(server.url + "/", query, tmp_path / "page.png", timeout=300)
    assert not shown["error"], shown["status"]
    first = shown["candidates"][0]
    assert first.startswith("chelsea") and "copy" in first and "not a copy" not in first
    assert all("not a copy" in c for c in shown["candidates"][1:])
    assert shown["overlay"].split()[0].isdigit() and int(shown["overlay"].split()[0]) > 0  # dots drawn
    assert shown["pageWidth"] <= shown["viewportWidth"]  # no sideways scrolling on a phone
    screenshot = Image.open(tmp_path / "page.png")
    assert screenshot.width == 412 and screenshot.height > 600
