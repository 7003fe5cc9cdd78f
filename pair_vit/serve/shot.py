"""The review page's screenshot check (scripts/review_screenshot.py): the real server on a free loopback port, a
collection built over HTTP if the folder holds none, the page driven by headless Chromium (`browser`).

    python scripts/review_screenshot.py --out runs/review.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pair_vit import data, demo_dir
from pair_vit.config import opt
from pair_vit.serve.browser import review_screenshot
from pair_vit.serve.process import ServerProcess


@dataclass
class ScreenshotConfig:
    """Serve a collection, choose a query in the review page with headless Chromium, save a screenshot."""

    collection: str = opt("runs/review/collection", "collection folder; built over HTTP from `references` if it "
                                                    "holds no saved collection")
    references: str = opt("", "folder of reference images (default: the package's skimage demo photos)")
    query: str = opt("", "image chosen in the page (default: a crop of the demo photo chelsea.jpg)")
    out: str = opt("runs/review/review.png", "screenshot (PNG) written here")
    width: int = opt(412, "viewport width in CSS pixels (412: a phone)")
    height: int = opt(915, "viewport height in CSS pixels")
    timeout: float = opt(600, "seconds the page may take to show the result")


def default_query(folder: Path) -> Path:
    """A crop of chelsea.jpg (an edited copy of a demo reference), written to `folder`."""
    from PIL import Image

    path = folder / "chelsea_crop.jpg"
    Image.open(Path(str(demo_dir())) / "skimage" / "chelsea.jpg").crop((90, 0, 300, 210)).save(path, quality=90)
    return path


def run(cfg: ScreenshotConfig) -> dict:
    import httpx

    from pair_vit.match.store import DB_FILE

    collection, out = Path(cfg.collection), Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    query = Path(cfg.query) if cfg.query else default_query(out.parent)
    with ServerProcess(collection, ["--log-level", "warning"], log=out.with_suffix(".log")) as server:
        if not (collection / DB_FILE).exists():
            refs = data.list_images(cfg.references or Path(str(demo_dir())) / "skimage")
            files = [("image", (p.name, p.read_bytes())) for p in refs.values()]
            added = httpx.post(server.url + "/references", files=files, timeout=cfg.timeout)
            added.raise_for_status()
        shown = review_screenshot(server.url + "/", query, out, cfg.width, cfg.height, cfg.timeout)
    print(json.dumps(shown, indent=1))
    print(f"screenshot -> {out}")
    return shown
