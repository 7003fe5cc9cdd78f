"""Uploaded images and request parameters, checked before any model runs.

    parts = await read_parts(form, what="query")            # [(id, bytes)] of the `image` parts
    uploads = checked(parts, max_pixels, folder)            # [Upload(id, sha256, path)], every one usable

Every upload is checked before the detector sees any: an empty part, a part that is not a file, a file that is
not an image, a truncated one, or one with more than `max_pixels` pixels (read from its header, so a
decompression bomb is refused before a pixel is decoded) fails the whole request with a `ServeError` naming the
field and the reason, and nothing is matched, added or removed. An image's id is its file name's stem, as for
`pair-vit index add`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pair_vit import data
from pair_vit.serve.errors import ServeError

FIELD = "image"  # the multipart field every image comes in
REFERENCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # safe in a URL path and a file name
CHECK_SIDE = 64  # the header check decodes at most this size (JPEG draft mode): validity, not pixels


@dataclass
class Upload:
    """One checked image: its id, its bytes' SHA-256 and where it was written."""

    image_id: str
    sha256: str
    path: Path


async def read_parts(form: Any, what: str) -> list[tuple[str, bytes]]:
    """(id, bytes) of every `image` part of a parsed multipart `form`, ids checked and unique."""
    parts = form.getlist(FIELD)
    if not parts:
        raise ServeError(400, f"no '{FIELD}' field: send the {what} images as multipart/form-data, "
                              f"one '{FIELD}' part each")
    found: dict[str, bytes] = {}
    for n, part in enumerate(parts):
        if isinstance(part, str):
            raise ServeError(400, f"'{FIELD}' part {n} is a text field, not a file")
        image_id = _image_id(part.filename, n, what)
        if image_id in found:
            raise ServeError(400, f"two {what} images have the id {image_id!r} (the file name's stem)")
        found[image_id] = await part.read()
    return list(found.items())


def checked(parts: list[tuple[str, bytes]], max_pixels: int, folder: Path) -> list[Upload]:
    """Write each part under `folder` and check it (module docstring): the first unusable one raises."""
    return [_checked(image_id, content, folder / str(n), max_pixels) for n, (image_id, content) in enumerate(parts)]


def _image_id(filename: str | None, n: int, what: str) -> str:
    stem = Path(filename or "").stem
    if what == "query":
        return stem or f"image_{n}"  # a query's id only labels its rows
    if not REFERENCE_ID.match(stem):
        raise ServeError(400, f"reference file name {filename!r}: its stem is the reference id, which must be 1-200 "
                              f"letters, digits, '.', '_' or '-', starting with a letter or digit")
    return stem


def _checked(image_id: str, content: bytes, path: Path, max_pixels: int) -> Upload:
    """Write `content` to `path` and decode its header (and a small draft): a ServeError if it is unusable."""
    if not content:
        raise ServeError(400, f"image {image_id!r} is empty (0 bytes)")
    path.write_bytes(content)
    try:
        data.load_image(path, max_pixels=max_pixels, max_side=CHECK_SIDE)
    except data.ImageLoadError as err:
        status = 413 if err.reason.startswith("image too large") else 400
        raise ServeError(status, f"image {image_id!r}: {err.reason}") from None
    return Upload(image_id, hashlib.sha256(content).hexdigest(), path)


# ----------------------------------------------------------------------------- parameters


def int_param(value: Any, name: str, default: int, low: int, high: int | None = None) -> int:
    """`value` (a query or form string, or None) as an int in [low, high]; a ServeError naming `name` if not."""
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise ServeError(400, f"{name} must be an integer, got {value!r}") from None
    if number < low or (high is not None and number > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ServeError(400, f"{name} must be {span}, got {number}")
    return number


def threshold_param(value: Any) -> float | None:
    """An is_copy threshold: None (the calibration's) or a number in [0, 1]."""
    if value is None or value == "":
        return None
    try:
        number = float(str(value))
    except ValueError:
        raise ServeError(400, f"threshold must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0 <= number <= 1:
        raise ServeError(400, f"threshold must be a number in [0, 1], got {value!r}")
    return number
