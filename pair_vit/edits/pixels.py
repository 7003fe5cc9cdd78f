"""Pixel-level edit families: colour changes, degradations and JPEG re-encoding.

Colour: grayscale, invert, solarize, posterize, color_jitter, channel_shuffle, opacity.
Degradations: pixelize, blur, noise. Encoding: jpeg.
Intensity ``t`` in [0, 1] moves each parameter from a mild but visible setting to a harsh one.
"""
from __future__ import annotations

import itertools

import albumentations as A
import augly.image as imaugs
import numpy as np
from PIL import Image

from .base import (COLOR, DEGRADE, ENCODE, Family, albu, choice, run_albu, seed, sign, span,
                   to_array)

# Channel orders other than the identity (which would be a no-op).
_PERMUTATIONS = [list(p) for p in itertools.permutations(range(3)) if p != (0, 1, 2)]


def sample_grayscale(rng: np.random.Generator, t: float) -> dict:
    """AugLy grayscale mode (luminosity-weighted or plain channel average); no intensity knob."""
    return {"mode": choice(rng, ["luminosity", "average"])}


def apply_grayscale(image: Image.Image, p: dict) -> Image.Image:
    return imaugs.grayscale(image, mode=p["mode"])


def sample_invert(rng: np.random.Generator, t: float) -> dict:
    """Colour negative; nothing to sample."""
    return {}


def invert_transform(p: dict) -> A.BasicTransform:
    return albu(A.InvertImg)


def apply_invert(image: Image.Image, p: dict) -> Image.Image:
    return run_albu(invert_transform(p), image)


def sample_solarize(rng: np.random.Generator, t: float) -> dict:
    """Pixels above ``threshold`` (fraction of 255) are inverted; lower threshold = harsher."""
    return {"threshold": span(rng, t, (0.5, 0.7), (0.2, 0.4))}


def solarize_transform(p: dict) -> A.BasicTransform:
    return albu(A.Solarize, threshold_range=(p["threshold"], p["threshold"]))


def apply_solarize(image: Image.Image, p: dict) -> Image.Image:
    return run_albu(solarize_transform(p), image)


def sample_posterize(rng: np.random.Generator, t: float) -> dict:
    """Bits kept per channel: 3-4 at t=0, 1-2 at t=1."""
    return {"bits": int(round(span(rng, t, (3, 4), (1, 2))))}


def posterize_transform(p: dict) -> A.BasicTransform:
    return albu(A.Posterize, num_bits=(p["bits"], p["bits"]))


def apply_posterize(image: Image.Image, p: dict) -> Image.Image:
    return run_albu(posterize_transform(p), image)


def sample_color_jitter(rng: np.random.Generator, t: float) -> dict:
    """Brightness/contrast/saturation factors around 1 and a hue shift (fraction of the wheel)."""
    def factor() -> float:
        return round(max(0.1, 1 + sign(rng) * span(rng, t, (0.15, 0.3), (0.45, 0.75))), 4)

    return {"brightness": factor(), "contrast": factor(), "saturation": factor(),
            "hue": sign(rng) * span(rng, t, (0.02, 0.06), (0.15, 0.4)), "seed": seed(rng)}


def color_jitter_transform(p: dict) -> A.BasicTransform:
    # Degenerate (v, v) ranges pin each factor; only the order of the four ops is random (seeded).
    return albu(A.ColorJitter, **{k: (p[k], p[k]) for k in ("brightness", "contrast", "saturation", "hue")})


def apply_color_jitter(image: Image.Image, p: dict) -> Image.Image:
    return run_albu(color_jitter_transform(p), image, p["seed"])


def sample_channel_shuffle(rng: np.random.Generator, t: float) -> dict:
    """A non-identity permutation of the RGB channels."""
    return {"order": list(choice(rng, _PERMUTATIONS))}


def channel_shuffle_transform(p: dict) -> A.BasicTransform:
    return albu(A.ChannelShuffle)


def apply_channel_shuffle(image: Image.Image, p: dict) -> Image.Image:
    # Explicit order instead of the transform's own draw, which may return the identity.
    out = channel_shuffle_transform(p).apply(to_array(image), channels_shuffled=p["order"])
    return Image.fromarray(np.ascontiguousarray(out))


def sample_opacity(rng: np.random.Generator, t: float) -> dict:
    """Fade towards white: the image keeps ``level`` of its contrast (0.6-0.8 at t=0, 0.2-0.4 at t=1)."""
    return {"level": span(rng, t, (0.6, 0.8), (0.2, 0.4))}


def apply_opacity(image: Image.Image, p: dict) -> Image.Image:
    # AugLy composites onto transparent white, so dropping alpha leaves the washed-out RGB.
    return imaugs.opacity(image.convert("RGB"), level=p["level"]).convert("RGB")


def sample_pixelize(rng: np.random.Generator, t: float) -> dict:
    """Downscale ratio before upscaling back; smaller = coarser blocks."""
    return {"ratio": span(rng, t, (0.3, 0.5), (0.05, 0.12))}


def apply_pixelize(image: Image.Image, p: dict) -> Image.Image:
    # Keep at least 2 pixels per side so tiny inputs do not hit a zero-size resize.
    ratio = max(p["ratio"], 2 / min(image.size))
    return imaugs.pixelization(image, ratio=ratio)


def sample_blur(rng: np.random.Generator, t: float) -> dict:
    """Gaussian blur radius as a fraction of the short side (~1-2.5 px at t=0, 5-10 px at t=1 on 256 px)."""
    return {"radius": span(rng, t, (0.004, 0.01), (0.02, 0.04))}


def apply_blur(image: Image.Image, p: dict) -> Image.Image:
    return imaugs.blur(image, radius=max(0.5, p["radius"] * min(image.size)))


def sample_noise(rng: np.random.Generator, t: float) -> dict:
    """Additive Gaussian noise variance on [0, 1] intensities, plus the seed of the noise field."""
    return {"var": span(rng, t, (0.002, 0.006), (0.02, 0.05)), "seed": seed(rng)}


def apply_noise(image: Image.Image, p: dict) -> Image.Image:
    # AugLy seeds numpy's *global* RNG; restore it so callers' np.random streams are not reset.
    state = np.random.get_state()
    try:
        return imaugs.random_noise(image, mean=0.0, var=float(p["var"]), seed=int(p["seed"]))
    finally:
        np.random.set_state(state)


def sample_jpeg(rng: np.random.Generator, t: float) -> dict:
    """JPEG quality: 45-70 at t=0 down to 8-15 at t=1."""
    return {"quality": int(round(span(rng, t, (45, 70), (8, 15))))}


def apply_jpeg(image: Image.Image, p: dict) -> Image.Image:
    return imaugs.encoding_quality(image, quality=p["quality"])


FAMILIES = [
    Family("grayscale", COLOR, sample_grayscale, apply_grayscale),
    Family("invert", COLOR, sample_invert, apply_invert, transform=invert_transform),
    Family("solarize", COLOR, sample_solarize, apply_solarize, transform=solarize_transform),
    Family("posterize", COLOR, sample_posterize, apply_posterize, transform=posterize_transform),
    Family("color_jitter", COLOR, sample_color_jitter, apply_color_jitter,
           transform=color_jitter_transform),
    Family("channel_shuffle", COLOR, sample_channel_shuffle, apply_channel_shuffle,
           transform=channel_shuffle_transform),
    Family("opacity", COLOR, sample_opacity, apply_opacity),
    Family("pixelize", DEGRADE, sample_pixelize, apply_pixelize),
    Family("blur", DEGRADE, sample_blur, apply_blur),
    Family("noise", DEGRADE, sample_noise, apply_noise),
    Family("jpeg", ENCODE, sample_jpeg, apply_jpeg),
]
