"""Localize, then verify: find where a reference sits inside a query, then read that region at full resolution.

    fine = model.tokens(query_fine)                        # (B, C, 2Gh, 2Gw): the query read at 2x the half size
    boxes, found = locate(ref_tokens, fine)                # (B, 4) x0, y0, x1, y1 fractions of the query; (B,) bool
    crops = crop(query_fine, boxes, model.half_size)       # (B, 3, h, w): each region resampled to the half size
    logits = model.forward_tokens(ref_tokens, model.tokens(crops))

A pair model reads the whole query at its half size (160 px: 10 x 10 tokens), so a copy that fills a third of
the query's side (a collage cell, a photo inside a screenshot, a paste) is about 3 x 3 tokens and the model
cannot recognise it. SIFT does, because it works at every scale. Here the query is also read at twice the half
size (20 x 20 tokens), the reference's tokens are matched to those (mutual nearest neighbours), the extent of
the matched query tokens is the box, and the box is cut out of the 2x query and read again at the half size: the
copy now fills the query half as the reference fills its own, at the scale the trunk saw in training.

Training runs the same functions on the same inputs (`pair_vit.pair.train`), so the model learns to read
localized regions, including the ones a look-alike's stray matches produce (they are negatives).
A pair whose box is not `found` (too few matches, or a box covering most of the query) reads the whole query
only: its local logit is its full logit, and no second trunk pass is spent on it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class LocalizeSettings:
    """How a box is found (stored in a checkpoint's model_args["localize"]; empty there: no localization)."""

    scale: int = 2  # the query is read at scale x the half size to find the box (20 x 20 tokens at 160 px)
    min_matches: int = 4  # fewer mutual nearest neighbours: no box, the whole query only
    quantile: float = 0.05  # the box spans the [q, 1 - q] quantiles of the matched tokens' centres (stray matches)
    margin: float = 0.1  # then grows by this fraction of its side on each side, plus half a token
    min_side: float = 0.2  # and is at least this fraction of the query's side (a sliver is grown, around its centre)
    max_area: float = 0.7  # a box covering more of the query than this is the whole query: not found

    @classmethod
    def from_args(cls, values: dict[str, Any] | None) -> "LocalizeSettings | None":
        """Settings from model_args["localize"] (None or {}: the model does not localize)."""
        if not values:
            return None
        unknown = set(values) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown localize setting(s) {sorted(unknown)}; known: {sorted(asdict(cls()))}")
        settings = cls(**values)
        if settings.scale < 1 or not 0 <= settings.quantile < 0.5 or not 0 < settings.min_side <= 1:
            raise ValueError(f"bad localize settings {values}: need scale >= 1, 0 <= quantile < 0.5, "
                             f"0 < min_side <= 1")
        return settings

    def to_args(self) -> dict[str, Any]:
        return asdict(self)


def fine_size(half_size: Sequence[int], settings: LocalizeSettings) -> tuple[int, int]:
    """(h, w) the query is read at to find boxes: `scale` x the model's half size."""
    return int(half_size[0]) * settings.scale, int(half_size[1]) * settings.scale


def locate(ref_tokens: torch.Tensor, query_tokens: torch.Tensor,
           settings: LocalizeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, gh, gw) reference tokens, (B, C, Gh, Gw) query tokens (any grids) -> boxes (B, 4) float32
    (x0, y0, x1, y1 as fractions of the query) and found (B,) bool.

    The box is the extent of the query tokens that are mutual nearest neighbours of a reference token (cosine
    similarity), trimmed to the [quantile, 1 - quantile] range, grown by `margin` and at least `min_side`.
    Not found (box = the whole query): fewer than `min_matches` matches, or a box covering more than `max_area`.
    """
    b, _, qh, qw = query_tokens.shape
    r = nn.functional.normalize(ref_tokens.float().flatten(2), dim=1)  # (B, C, Nr)
    q = nn.functional.normalize(query_tokens.float().flatten(2), dim=1)  # (B, C, Nq)
    sim = r.transpose(1, 2) @ q  # (B, Nr, Nq)
    nn_of_ref, nn_of_query = sim.argmax(2), sim.argmax(1)  # (B, Nr) into Nq, (B, Nq) into Nr
    mutual = torch.gather(nn_of_query, 1, nn_of_ref) == torch.arange(r.shape[2], device=sim.device)
    ys, xs = torch.div(nn_of_ref, qw, rounding_mode="floor"), nn_of_ref % qw
    centres = torch.stack([(xs.float() + 0.5) / qw, (ys.float() + 0.5) / qh], dim=2)  # (B, Nr, 2) in [0, 1]
    centres = centres.masked_fill(~mutual.unsqueeze(2), float("nan"))
    count = mutual.sum(1)
    lo = torch.nanquantile(centres, settings.quantile, dim=1)  # (B, 2) x, y; nan where no match
    hi = torch.nanquantile(centres, 1 - settings.quantile, dim=1)
    cell = torch.tensor([0.5 / qw, 0.5 / qh], device=sim.device)
    grow = settings.margin * (hi - lo) + cell
    boxes = _at_least(torch.cat([lo - grow, hi + grow], dim=1).clamp(0, 1), settings.min_side)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    found = (count >= settings.min_matches) & (area <= settings.max_area) & torch.isfinite(boxes).all(1)
    full = torch.tensor(FULL_BOX, device=sim.device).expand(b, 4)
    return torch.where(found.unsqueeze(1), boxes, full).float(), found


def _at_least(boxes: torch.Tensor, side: float) -> torch.Tensor:
    """(B, 4) boxes in [0, 1] -> each side grown around its centre to at least `side`, kept inside [0, 1]."""
    out = boxes.clone()
    for lo, hi in ((0, 2), (1, 3)):
        width = (boxes[:, hi] - boxes[:, lo]).clamp(min=side)
        start = ((boxes[:, lo] + boxes[:, hi]) / 2 - width / 2).clamp(0, 1).minimum(1 - width)
        out[:, lo], out[:, hi] = start, start + width
    return out


def crop(images: torch.Tensor, boxes: torch.Tensor, size: Sequence[int],
         index: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, H, W) float images, (B, 4) fractional boxes, output (h, w), (B,) image index per box (default:
    box i of image i) -> (B, 3, h, w) float32 crops, bilinear with 2 x 2 samples per output pixel (an
    antialiased downscale, a smooth upscale)."""
    from torchvision.ops import roi_align

    if index is None:
        index = torch.arange(len(boxes), device=boxes.device)
    h, w = images.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
    rois = torch.cat([index.float().unsqueeze(1), boxes.float() * scale], dim=1)
    return roi_align(images.float(), rois.to(images.device), output_size=(int(size[0]), int(size[1])),
                     spatial_scale=1.0, sampling_ratio=2, aligned=True)


def local_tokens(model, ref_tokens: torch.Tensor, fine_images: torch.Tensor, fine_tokens: torch.Tensor,
                 query_index: torch.Tensor, settings: LocalizeSettings
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The localized query side of B pairs: ref_tokens (B, C, Gh, Gw); fine_images (Q, 3, sH, sW) normalised
    queries read at `settings.scale` x the half size and fine_tokens (Q, C, sGh, sGw) their trunk tokens;
    query_index (B,) the pair's query. Returns (tokens (F, C, Gh, Gw) of the found boxes' crops, boxes (B, 4),
    found (B,) bool): only found pairs cost a trunk pass."""
    boxes, found = locate(ref_tokens, fine_tokens[query_index], settings)
    picked = found.nonzero().squeeze(1)
    if not len(picked):
        return ref_tokens.new_zeros((0, *ref_tokens.shape[1:])), boxes, found
    crops = crop(fine_images, boxes[picked], model.half_size, query_index[picked])
    return model.tokens(crops.to(fine_images.dtype)), boxes, found
