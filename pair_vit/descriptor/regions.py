"""Region proposals for queries: axis-aligned rectangles bounded by straight edges (collage cells, pastes).

A copy that shows its reference small, as one cell of a collage or pasted onto another photo, puts
the reference inside a rectangle whose sides are straight, long, axis-aligned intensity steps. A
global descriptor of the whole query (or of its halves) mostly describes the other content; a view
cropped to that rectangle describes the reference. `propose(image)` finds such rectangles:

1. edge maps: the largest per-channel step between neighbouring rows (columns) of a downscaled copy,
   thresholded;
2. lines: rows (columns) whose edge pixels form a long run, plus the image borders;
3. rectangles: every pair of horizontal and vertical lines, kept when all four sides are supported by
   edge pixels and no other supported line crosses the rectangle (so collage cells win over blocks of
   cells), of a useful size and shape; best supported first, overlapping boxes suppressed.

Boxes are fractions of the image (left, top, right, bottom), like `multiview.VIEW_BOXES`. On 200 dev-
benchmark queries: 0.8 proposals per query on average, at least one for 37% of them (most plain photos get
none); about 11 ms per image (192 px analysis size, 2-core CPU shared with a training job).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProposalConfig:
    size: int = 192             # longest side of the analysed copy, px: lines survive blur better small
    edge: float = 0.12          # a step of this much (0-1 intensity, any channel) between neighbours is an edge
    min_run: float = 0.15       # a line needs an edge run this long, as a fraction of the image side
    support: float = 0.7        # each rectangle side must be this fraction edge pixels (borders count fully)
    min_side: float = 0.15      # smallest rectangle side, as a fraction of the image side
    max_area: float = 0.7       # larger boxes are (nearly) the full view or a half, already embedded
    max_aspect: float = 4.0     # longest over shortest side of a box, in pixels
    max_lines: int = 12         # strongest candidate lines per axis (plus the two borders)
    max_boxes: int = 6          # proposals returned per image
    iou: float = 0.6            # non-maximum suppression: drop a box overlapping a better one this much


def _edge_maps(image: Image.Image, cfg: ProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (H-1, W) map of steps between rows y, y+1 and (H, W-1) map between columns x, x+1."""
    small = image.convert("RGB")
    small.thumbnail((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    a = np.asarray(small, dtype=np.float32) / 255.0
    rows = np.abs(np.diff(a, axis=0)).max(axis=2) > cfg.edge
    cols = np.abs(np.diff(a, axis=1)).max(axis=2) > cfg.edge
    return rows, cols


def _longest_run(b: np.ndarray) -> np.ndarray:
    """Length of the longest run of True along the last axis, per row of a 2-D boolean array."""
    padded = np.pad(b.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(padded, axis=1)
    best = np.zeros(len(b), dtype=np.int64)
    for i in range(len(b)):
        starts, ends = np.flatnonzero(d[i] == 1), np.flatnonzero(d[i] == -1)
        if len(starts):
            best[i] = int((ends - starts).max())
    return best


def _lines(edges: np.ndarray, cfg: ProposalConfig) -> list[int]:
    """Candidate line positions (boundary index + 1, in px) along axis 0 of an edge map, borders included.

    A step blurred over two rows is still one line: a row's edges are OR-ed with its neighbour's.
    """
    n, length = edges.shape
    merged = edges | np.roll(edges, 1, axis=0) if n > 1 else edges
    run = _longest_run(merged)
    strong = [i for i in np.argsort(-run, kind="stable") if run[i] >= cfg.min_run * length]
    picked: list[int] = []
    for i in strong:  # strongest first; a neighbour of a picked line is the same line
        if all(abs(int(i) - j) > 2 for j in picked):
            picked.append(int(i))
        if len(picked) == cfg.max_lines:
            break
    return sorted({0, n + 1, *(p + 1 for p in picked)})


def _side_support(edges: np.ndarray, pos: int, lo: int, hi: int) -> float:
    """Fraction of edge pixels along line `pos` (a boundary index + 1) from lo to hi; borders count 1."""
    if pos <= 0 or pos >= len(edges) + 1 or hi <= lo:
        return 1.0
    band = edges[max(pos - 2, 0):min(pos + 1, len(edges)), lo:hi].any(axis=0)
    return float(band.mean())


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _crossed(edges: np.ndarray, lines: list[int], lo: int, hi: int, a: int, b: int, cfg: ProposalConfig) -> bool:
    """Whether some supported line strictly between a and b spans lo..hi (the box is several cells)."""
    return any(_side_support(edges, p, lo, hi) >= cfg.support for p in lines if a + 2 < p < b - 2)


def _rectangles(rows: np.ndarray, cols: np.ndarray, cfg: ProposalConfig) -> list[tuple[float, tuple]]:
    height, width = rows.shape[0] + 1, cols.shape[1] + 1
    ys, xs = _lines(rows, cfg), _lines(cols.T, cfg)
    found = []
    for i, y0 in enumerate(ys):
        for y1 in ys[i + 1:]:
            if y1 - y0 < cfg.min_side * height:
                continue
            for j, x0 in enumerate(xs):
                for x1 in xs[j + 1:]:
                    box = (x0, y0, x1, y1)
                    if x1 - x0 < cfg.min_side * width or not _shape_ok(box, width, height, cfg):
                        continue
                    sides = (_side_support(rows, y0, x0, x1), _side_support(rows, y1, x0, x1),
                             _side_support(cols.T, x0, y0, y1), _side_support(cols.T, x1, y0, y1))
                    if min(sides) < cfg.support:
                        continue
                    if _crossed(rows, ys, x0, x1, y0, y1, cfg) or _crossed(cols.T, xs, y0, y1, x0, x1, cfg):
                        continue
                    found.append((float(np.mean(sides)), box))
    return found


def _shape_ok(box: tuple[int, int, int, int], width: int, height: int, cfg: ProposalConfig) -> bool:
    w, h = box[2] - box[0], box[3] - box[1]
    return w * h <= cfg.max_area * width * height and max(w, h) <= cfg.max_aspect * min(w, h)


def propose(image: Image.Image, cfg: ProposalConfig = ProposalConfig()) -> list[Box]:
    """Up to `cfg.max_boxes` rectangles of `image` bounded by straight edges, best supported first.

    Returns boxes as fractions (left, top, right, bottom) of the image; [] for an image with none
    (a plain photo usually has none; the full view and halves cover it).
    """
    rows, cols = _edge_maps(image, cfg)
    if rows.shape[0] < 4 or cols.shape[1] < 4:
        return []
    height, width = rows.shape[0] + 1, cols.shape[1] + 1
    kept: list[tuple[int, int, int, int]] = []
    for _, box in sorted(_rectangles(rows, cols, cfg), key=lambda t: (-t[0], t[1])):
        if all(_iou(box, other) < cfg.iou for other in kept):
            kept.append(box)
        if len(kept) == cfg.max_boxes:
            break
    return [(x0 / width, y0 / height, x1 / width, y1 / height) for x0, y0, x1, y1 in kept]
