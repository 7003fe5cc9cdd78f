"""Pictures for people: image grids for notebooks, the demo and reports (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image], titles: Sequence[str] | None = None, ncols: int = 6,
               cell: float = 2.0, suptitle: str = ""):
    """A matplotlib Figure showing `images` in rows of `ncols`, each with its title (small font)."""
    import matplotlib.pyplot as plt

    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows * 1.1), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            if titles:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from pair_vit.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
