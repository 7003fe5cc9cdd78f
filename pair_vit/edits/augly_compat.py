"""Compatibility shim that lets AugLy 1.0.0 run on current Pillow (>= 10) and numpy (>= 1.24).

AugLy 1.0.0 is the last release and two of its image functions are broken today:

* ``augly.image.meme_format`` calls ``FreeTypeFont.getsize_multiline`` to fit the caption,
  a method Pillow 10 removed (``AttributeError: 'FreeTypeFont' object has no attribute
  'getsize_multiline'``).
* ``augly.image.perspective_transform`` calls ``augly.image.utils.utils.compute_transform_coeffs``,
  which builds ``np.matrix(..., dtype=np.float)``; numpy 1.24 removed the ``np.float`` alias
  (``AttributeError: module 'numpy' has no attribute 'float'``). The bounding-box helper
  ``augly.image.utils.bboxes`` (used when bboxes are passed to the same function) has the same bug.

What :func:`apply` patches, narrowly (no global Pillow/numpy object is modified):

* the module global ``ImageFont`` *inside* ``augly.image.functional`` is replaced by a proxy of
  ``PIL.ImageFont`` whose ``truetype`` returns :class:`LegacyFreeTypeFont`, a ``FreeTypeFont``
  subclass that adds back ``getsize`` / ``getsize_multiline`` computed from the modern
  ``getbbox`` / ``multiline_textbbox`` (same (right, bottom) extent the old methods returned).
  Every other ``ImageFont`` attribute is forwarded unchanged, so ``overlay_text`` is unaffected.
* the module global ``np`` *inside* ``augly.image.utils.utils`` and ``augly.image.utils.bboxes``
  is replaced by a proxy of numpy that additionally defines ``float = float`` (what the alias
  always meant). All other attributes are forwarded to the real numpy.

``apply()`` is idempotent (a second call is a no-op) and is run when ``pair_vit.edits`` is imported.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np
from PIL import Image, ImageDraw, ImageFont


class ModuleProxy(types.ModuleType):
    """Stand-in for a module: a few names overridden, every other attribute read from ``wrapped``."""

    def __init__(self, wrapped: types.ModuleType, **overrides):
        super().__init__(wrapped.__name__, getattr(wrapped, "__doc__", None))
        self.__wrapped__ = wrapped
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        # Only reached for names not overridden above.
        return getattr(self.__wrapped__, name)


class LegacyFreeTypeFont(ImageFont.FreeTypeFont):
    """``FreeTypeFont`` plus the Pillow < 10 size queries that AugLy 1.0.0 still calls."""

    def getsize(self, text, *args, **kwargs):
        """(width, height) of a single line, as the removed Pillow method returned it."""
        _, _, right, bottom = self.getbbox(text, *args, **kwargs)
        return right, bottom

    def getsize_multiline(self, text, direction=None, spacing=4, features=None, language=None,
                          stroke_width=0):
        """(width, height) of multi-line ``text`` drawn at (0, 0), as the removed method returned it."""
        draw = ImageDraw.Draw(Image.new("L", (1, 1)))
        _, _, right, bottom = draw.multiline_textbbox(
            (0, 0), text, font=self, spacing=spacing, direction=direction, features=features,
            language=language, stroke_width=stroke_width)
        return right, bottom


_basic_layout = False  # set by `basic_text_layout`


@contextlib.contextmanager
def basic_text_layout():
    """Within: fonts AugLy opens use Pillow's basic text layout instead of raqm, whose shaping fails
    ("raqm_layout() failed") on about 1% of the random glyph strings `overlay_text` draws."""
    global _basic_layout
    before, _basic_layout = _basic_layout, True
    try:
        yield
    finally:
        _basic_layout = before


def _legacy_truetype(font=None, size=10, index=0, encoding="", layout_engine=None):
    """``ImageFont.truetype`` returning a :class:`LegacyFreeTypeFont`."""
    if _basic_layout:
        layout_engine = ImageFont.Layout.BASIC
    return LegacyFreeTypeFont(font, size, index, encoding, layout_engine)


def is_applied() -> bool:
    """True once :func:`apply` has patched AugLy's modules."""
    import augly.image.functional as functional
    import augly.image.utils.utils as img_utils

    numpy_ok = hasattr(np, "float") or isinstance(img_utils.np, ModuleProxy)
    return isinstance(functional.ImageFont, ModuleProxy) and numpy_ok


def apply() -> None:
    """Patch AugLy 1.0.0's image modules (see the module docstring). Safe to call repeatedly."""
    import augly.image.functional as functional
    import augly.image.utils.bboxes as bboxes
    import augly.image.utils.utils as img_utils

    if not isinstance(functional.ImageFont, ModuleProxy):
        functional.ImageFont = ModuleProxy(ImageFont, truetype=_legacy_truetype)
    for module in (img_utils, bboxes):
        # Only patch when numpy really lacks the alias (numpy < 1.24 still has it).
        if not isinstance(module.np, ModuleProxy) and not hasattr(np, "float"):
            module.np = ModuleProxy(np, float=float)
