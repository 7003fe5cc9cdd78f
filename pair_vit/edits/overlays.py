"""Overlay and composition edit families.

Overlays on the image itself: overlay_text, overlay_emoji, meme (caption bar), screenshot (web /
mobile frame). Compositions with another photo, a "donor": paste_onto (the image pasted small onto
the donor), paste_over (the donor pasted over part of the image), collage (a grid of the image and
donors). Donor families receive ``params["donor"]``, an index into the donors list passed to
``apply_chain`` (taken modulo its length, so a chain sampled for n donors also runs with fewer).
Intensity ``t`` grows the covered area / shrinks the share of the original image.
"""
from __future__ import annotations

import functools
import os

import augly.image as imaugs
import numpy as np
from augly.utils import EMOJI_DIR, FONTS_DIR, SCREENSHOT_TEMPLATES_DIR
from PIL import Image, ImageOps

from . import augly_compat
from .base import OVERLAY, Family, choice, color, span

# Fonts (AugLy assets) with a character table (.pkl) that render readable glyphs; a few non-Latin
# scripts because DISC21 text overlays use them too.
TEXT_FONTS = [
    "Raleway-Bold", "Montserrat-Regular", "OpenSans-Bold", "IBMPlexSans-Regular",
    "IBMPlexMono-Bold", "Impact", "Chunkfive", "Pacifico", "Lobster_1.3", "Ubuntu-R",
    "SourceSansPro-Black", "PlayfairDisplay-Bold", "Titillium-Regular", "Quicksand-Bold",
    "KaushanScript-Regular", "OstrichSans-Heavy", "NotoSans-Regular", "NotoNaskhArabic-Regular",
    "NotoSansHebrew-Regular", "NotoSansThai-Regular",
]
MEME_FONTS = ["Raleway-ExtraBold", "Impact", "Montserrat-Black", "LeagueSpartan-Bold", "OpenSans-Bold"]
MEME_TEXTS = ["LOL", "WOW", "ME IRL", "SO TRUE", "NOPE", "OMG", "MOOD", "SAME", "WHY",
              "MONDAYS", "GOALS", "THIS IS FINE", "WHEN YOU SEE IT", "NOT AGAIN"]
# Collage grids (rows, cols) ordered by number of cells: intensity picks further down the list.
COLLAGE_GRIDS = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2), (3, 3)]


@functools.lru_cache(maxsize=1)
def emoji_paths() -> tuple[str, ...]:
    """Twemoji PNGs shipped with AugLy, relative to its emoji folder, sorted for reproducibility."""
    found = [os.path.relpath(os.path.join(d, f), EMOJI_DIR)
             for d, _, files in os.walk(EMOJI_DIR) for f in files if f.endswith(".png")]
    return tuple(sorted(found))


def _font(name: str) -> str:
    return os.path.join(FONTS_DIR, name + ".ttf")


def _donor(donors, index: int) -> Image.Image:
    return donors[index % len(donors)].convert("RGB")


def _text_color(rng: np.random.Generator) -> list[int]:
    # Mostly white or black captions as on social media; random colours can vanish into the photo.
    u = rng.random()
    return [255, 255, 255] if u < 0.4 else [0, 0, 0] if u < 0.7 else color(rng)


def sample_overlay_text(rng: np.random.Generator, t: float) -> dict:
    """Random glyph strings (indices into the font's character table), 1 line at t=0 up to 3."""
    n_lines = 1 + int(rng.random() < t) + int(rng.random() < t / 2)
    n_chars = int(span(rng, t, (4, 10), (8, 16)))
    return {"text": [[int(c) for c in rng.integers(0, 10_000, n_chars)] for _ in range(n_lines)],
            "font": choice(rng, TEXT_FONTS), "size": span(rng, t, (0.08, 0.14), (0.12, 0.25)),
            "color": _text_color(rng), "opacity": span(rng, t, (0.8, 1.0), (0.6, 1.0)),
            "x": span(rng, t, (0.0, 0.6), (0.0, 0.4)), "y": span(rng, t, (0.0, 0.85), (0.0, 0.6))}


def apply_overlay_text(image: Image.Image, p: dict) -> Image.Image:
    # AugLy's font size is int(size * short side); keep it >= 1 px on tiny images.
    size = max(p["size"], 1.0 / min(image.size))
    image = image.convert("RGB")
    draw = functools.partial(imaugs.overlay_text, image, text=p["text"], font_file=_font(p["font"]),
                             font_size=size, color=tuple(p["color"]), x_pos=p["x"], y_pos=p["y"])
    try:
        texted = draw()
    except RuntimeError as err:  # raqm cannot shape some glyph strings; the basic layout always draws them
        if "raqm" not in str(err):
            raise
        with augly_compat.basic_text_layout():
            texted = draw()
    # AugLy draws the text alpha into an RGBA copy and then drops alpha, so its `opacity` argument
    # has no effect on RGB images; blending with the original gives the intended translucency.
    return Image.blend(image, texted, p["opacity"])


def sample_overlay_emoji(rng: np.random.Generator, t: float) -> dict:
    """1 emoji at t=0 (15-25% of the height) up to 3 larger ones (30-50%) at t=1."""
    def one() -> dict:
        size = span(rng, t, (0.15, 0.25), (0.3, 0.5))
        return {"path": choice(rng, emoji_paths()), "size": size, "opacity": span(rng, t, (0.7, 1), (0.8, 1)),
                "x": round(float(rng.uniform(0, 1 - size)), 4), "y": round(float(rng.uniform(0, 1 - size)), 4)}

    return {"emojis": [one() for _ in range(1 + int(rng.random() < t) + int(rng.random() < t / 2))]}


def apply_overlay_emoji(image: Image.Image, p: dict) -> Image.Image:
    for e in p["emojis"]:
        image = imaugs.overlay_emoji(image, emoji_path=os.path.join(EMOJI_DIR, e["path"]),
                                     opacity=e["opacity"], emoji_size=e["size"], x_pos=e["x"], y_pos=e["y"])
    return image.convert("RGB")


def sample_meme(rng: np.random.Generator, t: float) -> dict:
    """Caption bar above the image, 15-25% (t=0) to 30-50% (t=1) of the image height."""
    classic = rng.random() < 0.7  # black on white, like most memes
    return {"text": choice(rng, MEME_TEXTS), "font": choice(rng, MEME_FONTS),
            "caption": span(rng, t, (0.15, 0.25), (0.3, 0.5)),
            "text_color": [0, 0, 0] if classic else color(rng),
            "bg_color": [255, 255, 255] if classic else color(rng)}


def apply_meme(image: Image.Image, p: dict) -> Image.Image:
    # AugLy shrinks the font in steps of 5 px until the caption fits and crashes if it reaches 0,
    # so give narrow/small images room first (the battery's size guard shrinks the result back).
    if image.width < 160:
        image = image.resize((160, max(1, round(image.height * 160 / image.width))), Image.BICUBIC)
    caption = max(30, round(p["caption"] * image.height))
    return imaugs.meme_format(image, text=p["text"], font_file=_font(p["font"]), caption_height=caption,
                              text_color=tuple(p["text_color"]), meme_bg_color=tuple(p["bg_color"]))


def sample_screenshot(rng: np.random.Generator, t: float) -> dict:
    """Web or mobile frame; cropping the image to fill the frame gets likelier with intensity."""
    return {"template": choice(rng, ["web", "mobile"]), "crop": bool(rng.random() < 0.2 + 0.6 * t)}


def apply_screenshot(image: Image.Image, p: dict) -> Image.Image:
    # The frame is scaled to the image, not the image to the frame, capped at 4x the image's area.
    return imaugs.overlay_onto_screenshot(
        image, template_filepath=os.path.join(SCREENSHOT_TEMPLATES_DIR, p["template"] + ".png"),
        resize_src_to_match_template=False, crop_src_to_fit=p["crop"],
        max_image_size_pixels=4 * image.width * image.height).convert("RGB")


def sample_paste_onto(rng: np.random.Generator, t: float) -> dict:
    """Image height as a fraction of the donor's: 50-80% at t=0, 20-35% at t=1."""
    size = span(rng, t, (0.5, 0.8), (0.2, 0.35))
    return {"size": size, "x": round(float(rng.uniform(0, 1 - size)), 4),
            "y": round(float(rng.uniform(0, 1 - size)), 4)}


def apply_paste_onto(image: Image.Image, p: dict, donors) -> Image.Image:
    # The donor, cropped to the image's shape and size, becomes the canvas: the output keeps the
    # input's size whatever the donor's shape (a sliver donor cannot shrink the paste to 0 px).
    background = ImageOps.fit(_donor(donors, p["donor"]), image.size)
    return imaugs.overlay_onto_background_image(image, background_image=background, overlay_size=p["size"],
                                                x_pos=p["x"], y_pos=p["y"]).convert("RGB")


def sample_paste_over(rng: np.random.Generator, t: float) -> dict:
    """Donor height as a fraction of the image's: 20-35% at t=0 up to 45-70% at t=1."""
    size = span(rng, t, (0.2, 0.35), (0.45, 0.7))
    return {"size": size, "opacity": span(rng, t, (0.7, 1.0), (0.85, 1.0)),
            "x": round(float(rng.uniform(0, 1 - size)), 4), "y": round(float(rng.uniform(0, 1 - size)), 4)}


def apply_paste_over(image: Image.Image, p: dict, donors) -> Image.Image:
    return imaugs.overlay_image(image, overlay=_donor(donors, p["donor"]), opacity=p["opacity"],
                                overlay_size=p["size"], x_pos=p["x"], y_pos=p["y"]).convert("RGB")


def sample_collage(rng: np.random.Generator, t: float) -> dict:
    """Grid shape (2-4 cells at t=0, 6-9 at t=1), the image's cell, gap and background colour."""
    rows, cols = COLLAGE_GRIDS[int(span(rng, t, (0, 2.99), (5, 7.99)))]
    return {"rows": rows, "cols": cols, "slot": int(rng.integers(rows * cols)),
            "gap": span(rng, t, (0.0, 0.05), (0.0, 0.05)), "color": color(rng)}


def apply_collage(image: Image.Image, p: dict, donors) -> Image.Image:
    # AugLy has no collage; PIL composition. Cells take the image's aspect; donors are cropped to fit.
    rows, cols, (w, h) = p["rows"], p["cols"], image.size
    scale = min(1.0, 2 * max(w, h) / max(cols * w, rows * h))  # canvas <= 2x the input's long side
    cw, ch = max(16, round(w * scale)), max(16, round(h * scale))
    gap = round(p["gap"] * min(cw, ch))
    canvas = Image.new("RGB", (cols * cw + (cols + 1) * gap, rows * ch + (rows + 1) * gap), tuple(p["color"]))
    for cell in range(rows * cols):
        tile = image if cell == p["slot"] else _donor(donors, p["donor"] + cell)
        r, c = divmod(cell, cols)
        canvas.paste(ImageOps.fit(tile.convert("RGB"), (cw, ch)), (gap + c * (cw + gap), gap + r * (ch + gap)))
    return canvas


FAMILIES = [
    Family("overlay_text", OVERLAY, sample_overlay_text, apply_overlay_text),
    Family("overlay_emoji", OVERLAY, sample_overlay_emoji, apply_overlay_emoji),
    Family("meme", OVERLAY, sample_meme, apply_meme),
    Family("screenshot", OVERLAY, sample_screenshot, apply_screenshot),
    Family("paste_onto", OVERLAY, sample_paste_onto, apply_paste_onto, needs_donor=True),
    Family("paste_over", OVERLAY, sample_paste_over, apply_paste_over, needs_donor=True),
    Family("collage", OVERLAY, sample_collage, apply_collage, needs_donor=True),
]
