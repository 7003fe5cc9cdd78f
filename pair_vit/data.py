"""Image folders, the DISC21 layout, robust image loading and the train/dev split.

DISC21 (the ISC2021 data set) is laid out as::

    root/
        queries/            Q00000.jpg ...   edited copies (and distractors) to search for
        references/         R000000.jpg ...  the collection searched against
        ground_truth.csv    query_id,reference_id  (optional; unmatched queries have an empty reference_id)
        train/              T000000.jpg ...  unlabelled training photos (optional)

An image's id is its file stem, so every folder is read with `list_images`, which walks
sub-folders too (our own training folder nests its sources: bsds500/, clothing/, ...) and
refuses two files with the same stem, because an id must name exactly one image.

Every stage decodes images through `load_image`: it always returns a fully decoded RGB image,
and turns every way a file can be unusable (missing, empty, truncated, not an image, a
decompression bomb) into `ImageLoadError` with a short reason. `load_images` skips those files,
records them in a `SkipReport` and logs a warning, so one bad file never stops a long run.

`split_of` assigns an image to "train" or "dev" from a hash of its id alone, so adding or
removing other images never moves an image between splits.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from pair_vit.io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 100_000_000
GT_COLUMNS = ("query_id", "reference_id")
SPLITS = ("train", "dev", "all")

# Pillow's bomb check reads the module-global Image.MAX_IMAGE_PIXELS; we raise it only for the
# duration of one Image.open under this lock and restore it, so the caller's setting survives.
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageLoadError(Exception):
    """An image file that cannot be used; `reason` is short enough for a log line or CSV cell."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        # Passing both to Exception keeps the error picklable (DataLoader workers send it back).
        super().__init__(self.path, reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DuplicateIdError(ValueError):
    """Two files in one image folder share a stem, so the id would be ambiguous."""


# ----------------------------------------------------------------------------- folders


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which carry an image extension.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_image_files(folder: Path, recursive: bool) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        # Prune hidden folders in place and sort, so duplicate reports name files in a stable order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            if _is_image_name(name):
                yield Path(dirpath) / name


def list_images(folder: str | os.PathLike, recursive: bool = True) -> dict[str, Path]:
    """Map image id (file stem) -> path for every image file under `folder`, sorted by id."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    found: dict[str, Path] = {}
    for path in _walk_image_files(folder, recursive):
        if path.stem in found:
            raise DuplicateIdError(
                f"image id {path.stem!r} is used by two files: {found[path.stem]} and {path}"
            )
        found[path.stem] = path
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------- loading


def _open_checked(fp, path: Path, max_pixels: int) -> Image.Image:
    """Parse the header only and refuse images over `max_pixels` before any pixel is decoded."""
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        # Our limit replaces Pillow's: no DecompressionBombWarning, our own error right below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and saved < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            # Pillow refuses at 2x its limit, which is above ours: the image is over our limit too.
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
            raise ImageLoadError(path, f"image too large: {size} > {max_pixels}") from None
        except UnidentifiedImageError:
            raise ImageLoadError(path, "not an image") from None
        except Exception as e:  # a recognised format whose header is broken
            raise ImageLoadError(path, _describe_decode_error(e)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w * h > max_pixels:
        raise ImageLoadError(path, f"image too large: {w}x{h} pixels > {max_pixels}")
    return im


def _draft_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """Target size so the longest side is `max_side`, or None when no downscaling is needed."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _decode(im: Image.Image, path: Path, max_side: int | None) -> Image.Image:
    target = _draft_size(im.size, max_side)
    if target is not None and im.format in ("JPEG", "MPO"):  # MPO: multi-frame camera JPEGs
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly, at least as big as `target`.
        im.draft(None, target)
    try:
        im.load()
    except Exception as e:  # Pillow raises many types for corrupt data; all mean "unusable".
        raise ImageLoadError(path, _describe_decode_error(e)) from None
    return im


def _describe_decode_error(e: Exception) -> str:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "truncated" in message.lower():
        return "truncated"
    return f"corrupt image ({message})"


def _exif_upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # A malformed EXIF block should not cost us an otherwise good image.
        logger.debug("ignoring unreadable EXIF orientation: %s", e)
        return im


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Map high-bit-depth or float grey levels to 0..255 using the nominal range they fit in."""
    is_float = values.dtype.kind == "f"
    # float32 halves the memory of float64 and is plenty for 8-bit output.
    values = np.nan_to_num(values.astype(np.float32))
    lo, hi = float(values.min()), float(values.max())
    if is_float and lo >= 0 and hi <= 1:
        top = 1.0
    elif lo >= 0 and hi <= 255:
        top = 255.0
    elif lo >= 0 and hi <= 65535:
        top = 65535.0
    else:  # Outside every nominal range (negative or huge): stretch the actual range instead.
        values, top = values - lo, max(hi - lo, 1e-12)
    return np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)


def _grey_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16"):
        # 16-bit samples use the full 0..65535 range; convert("L") would clip them to white.
        grey = ((np.asarray(im).astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        grey = _to_uint8(np.asarray(im))
    return Image.fromarray(grey, mode="L").convert("RGB")


def _on_white(im: Image.Image) -> Image.Image:
    # Transparent areas are usually background; black would invent dark regions a copy lacks.
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _grey_to_rgb(im)
    # "transparency" covers palette images and RGB/L images with a tRNS colour key.
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _on_white(im)
    return im.convert("RGB")


def _shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    target = _draft_size(im.size, max_side)
    if target is None:
        return im
    return im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _read(path: Path, max_pixels: int, max_side: int | None) -> Image.Image:
    try:
        with open(path, "rb") as fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise ImageLoadError(path, "empty file")
            return _decode(_open_checked(fp, path, max_pixels), path, max_side)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a folder, not a file") from None
    except OSError as e:  # permissions, I/O errors: the file itself cannot be read
        raise ImageLoadError(path, f"cannot read file ({e.strerror or e})") from None


def load_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """Decode `path` fully into an upright RGB image; raise ImageLoadError if it is unusable.

    Images with more than `max_pixels` pixels are refused from their header, before decoding.
    `max_side` downscales so the longest side is at most that many pixels.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    path = Path(path)
    return _upright_rgb(_read(path, max_pixels, max_side), path, max_side)


def load_image_bytes(
    content: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """`load_image` for an image held in memory (e.g. an upload); `name` only labels the ImageLoadError."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    path = Path(name)
    if not content:
        raise ImageLoadError(path, "empty file")
    im = _decode(_open_checked(io.BytesIO(content), path, max_pixels), path, max_side)
    return _upright_rgb(im, path, max_side)


def _upright_rgb(im: Image.Image, path: Path, max_side: int | None) -> Image.Image:
    try:
        rgb = _to_rgb(_exif_upright(im))
    except (ValueError, OSError) as e:  # e.g. a colour mode Pillow cannot convert to RGB
        raise ImageLoadError(path, f"unsupported image mode {im.mode} ({e})") from None
    return _shrink(rgb, max_side)


@dataclass
class SkipReport:
    """Images that could not be used, with why; summarised at the end of a run and saved as CSV. Each image is
    listed once, with the first reason given (two stages decoding the same query both find it unreadable)."""

    entries: list[tuple[Path, str]] = field(default_factory=list)
    max_listed: int = 5
    _seen: set[Path] = field(default_factory=set, repr=False, compare=False)

    def add(self, path: str | os.PathLike, reason: str) -> None:
        path = Path(path)
        if len(self._seen) != len(self.entries):  # entries set or extended directly (gathered from processes)
            self._seen = {p for p, _ in self.entries}
        if path in self._seen:
            return
        self._seen.add(path)
        self.entries.append((path, reason))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[Path, str]]:
        return iter(self.entries)

    def summary(self) -> str:
        n = len(self.entries)
        noun = "image" if n == 1 else "images"
        if n == 0:
            return "0 images skipped"
        listed = ", ".join(f"{p.name} ({r})" for p, r in self.entries[: self.max_listed])
        more = f", ... and {n - self.max_listed} more" if n > self.max_listed else ""
        return f"{n} {noun} skipped: {listed}{more}"

    def write_csv(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows((str(p), r) for p, r in self.entries)


def load_images(
    paths: Iterable[str | os.PathLike], report: SkipReport, **load_kwargs
) -> Iterator[tuple[Path, Image.Image]]:
    """Yield (path, RGB image) for each loadable path; record and log the others in `report`."""
    for path in paths:
        path = Path(path)
        try:
            im = load_image(path, **load_kwargs)
        except ImageLoadError as e:
            report.add(e.path, e.reason)
            logger.warning("skipping image %s: %s", e.path, e.reason)
            continue
        yield path, im


# ----------------------------------------------------------------------------- ground truth


def _empty_ground_truth() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in GT_COLUMNS})


def read_ground_truth(path: str | os.PathLike) -> pd.DataFrame:
    """Read query_id,reference_id pairs as strings; drop unmatched (empty reference) and duplicate rows."""
    path = Path(path)
    try:
        # keep_default_na=False: an id like "NA" stays a string and empty cells stay "".
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty ground-truth file, expected header query_id,reference_id") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in GT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: ground truth needs header query_id,reference_id; missing {missing}, "
            f"found columns {list(df.columns)}"
        )
    df = df[list(GT_COLUMNS)].apply(lambda col: col.str.strip())
    if (df["query_id"] == "").any():
        raise ValueError(f"{path}: {int((df['query_id'] == '').sum())} rows have an empty query_id")
    df = df[df["reference_id"] != ""].drop_duplicates()
    return df.reset_index(drop=True)


@dataclass
class DiscLayout:
    """Where the parts of a DISC21-style data set live (see the module docstring)."""

    queries: Path
    references: Path
    ground_truth: Path | None = None
    train: Path | None = None

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> DiscLayout:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data set root folder not found: {root}")
        for name in ("queries", "references"):
            if not (root / name).is_dir():
                raise FileNotFoundError(f"expected a {name}/ folder in {root}: {root / name} not found")
        gt, train = root / "ground_truth.csv", root / "train"
        return cls(
            queries=root / "queries",
            references=root / "references",
            ground_truth=gt if gt.is_file() else None,
            train=train if train.is_dir() else None,
        )

    def query_images(self) -> dict[str, Path]:
        return list_images(self.queries)

    def reference_images(self) -> dict[str, Path]:
        return list_images(self.references)

    def load_ground_truth(self) -> pd.DataFrame:
        if self.ground_truth is None:
            return _empty_ground_truth()
        return read_ground_truth(self.ground_truth)


# ----------------------------------------------------------------------------- train/dev split


def split_of(image_id: str, seed: int = 0, dev_fraction: float = 0.25) -> str:
    """"dev" for about `dev_fraction` of ids, else "train"; depends only on (seed, image_id)."""
    if not 0.0 <= dev_fraction <= 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode("utf-8")).digest()
    # The first 8 bytes as a uniform number in [0, 1).
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "dev" if u < dev_fraction else "train"


def split_images(
    images: dict[str, Path], split: str, seed: int = 0, dev_fraction: float = 0.25
) -> dict[str, Path]:
    """The subset of `images` (id -> path) in `split`: "train", "dev" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return dict(images)
    return {i: p for i, p in images.items() if split_of(i, seed, dev_fraction) == split}
