"""Image inputs of the library API (`pair_vit.match.detector`): paths, folders, PIL images or a mapping id -> path or
image, turned into the id -> file mapping every stage reads (`index.embed_folder`, the image caches).

    with image_inputs(["a.jpg", "photos/", pil_image], None, report) as given:
        given.paths     # id -> file: a.jpg -> "a", every image under photos/ by stem, the PIL image -> "image_2"

PIL images are written losslessly (PNG) to a temporary folder for the duration of the block, so they are decoded
exactly as the same image in a file would be. One id for two images is refused, naming both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pair_vit import data

IN_MEMORY = "<in-memory image>"  # the source recorded for an image given as a PIL image


@dataclasses.dataclass
class Inputs:
    paths: dict[str, Path]  # id -> file of every usable input
    sources: dict[str, str]  # id -> the resolved path it came from, or IN_MEMORY
    names: dict[str, str]  # str(file) -> id, to read a SkipReport back as ids

    def skipped(self, report: data.SkipReport) -> dict[str, str]:
        """id -> why the image could not be used, for every entry of `report`."""
        return {self.names.get(str(p), Path(p).stem): reason for p, reason in report}


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def _items(images: Any, ids: Sequence[str] | None) -> list[tuple[str, Any]]:
    """(id, path or PIL image) pairs: a mapping's items; else `ids` zipped with the images; else a file's stem,
    every image of a folder by stem (`data.list_images`), image_<position> for a PIL image."""
    from PIL import Image

    if isinstance(images, Mapping):
        if ids is not None:
            raise ValueError("give ids either as the mapping's keys or as `ids`, not both")
        return [(str(i), v) for i, v in images.items()]
    images = [images] if _is_path(images) or isinstance(images, Image.Image) else list(images)
    if ids is not None:
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        return [(str(i), v) for i, v in zip(ids, images)]
    items: list[tuple[str, Any]] = []
    for n, item in enumerate(images):
        if _is_path(item) and Path(item).is_dir():
            items.extend(data.list_images(item).items())
        elif _is_path(item):
            items.append((Path(item).stem, Path(item)))
        elif isinstance(item, Image.Image):
            items.append((f"image_{n}", item))
        else:
            raise TypeError(f"expected an image path, a folder or a PIL image, got {type(item).__name__}")
    return items


@contextlib.contextmanager
def image_inputs(images: Any, ids: Sequence[str] | None, report: data.SkipReport,
                 what: str = "reference") -> Iterator[Inputs]:
    """`images` as files, for the duration of the block (see the module docstring). An in-memory image that cannot
    be written (e.g. lazily opened from a truncated file) goes to `report` and is left out of `paths`."""
    from PIL import Image

    found = Inputs({}, {}, {})
    with tempfile.TemporaryDirectory(prefix="pair_vit_inputs_") as tmp:
        for n, (image_id, item) in enumerate(_items(images, ids)):
            memory = isinstance(item, Image.Image)
            source = IN_MEMORY if memory else str(Path(item).resolve())
            if image_id in found.sources:
                raise data.DuplicateIdError(f"{what} id {image_id!r} is used by two images: "
                                            f"{found.sources[image_id]} and {source}")
            found.sources[image_id] = source
            path = Path(tmp) / f"{n}.png" if memory else Path(item)
            found.names[str(path)] = image_id
            if not memory or _written(item, path, report):
                found.paths[image_id] = path
        yield found


def _written(image: Any, path: Path, report: data.SkipReport) -> bool:
    """Save `image` as PNG at `path` (as RGB if PNG cannot hold its mode); False, reported, if it cannot be."""
    try:
        try:
            image.save(path, format="PNG", compress_level=1)
        except (OSError, ValueError, KeyError):
            image.convert("RGB").save(path, format="PNG", compress_level=1)
        return True
    except Exception as err:
        report.add(path, f"unusable in-memory image ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
        path.unlink(missing_ok=True)
        return False
