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


def match_grid(queries: dict[str, Path], references: dict[str, Path], submission, ground_truth, n_queries: int = 6,
               top: int = 3, seed: int = 0, title: str = ""):
    """Rows of [query, its `top` highest-scoring references]; each candidate titled with its score and a
    tick for a true copy. Shows queries that have a true reference first (a random sample, `seed`)."""
    import numpy as np

    from pair_vit.data import load_image

    truth = set(zip(ground_truth.query_id.astype(str), ground_truth.reference_id.astype(str)))
    with_gt = sorted({q for q, _ in truth} & set(submission.query_id))
    rng = np.random.default_rng(seed)
    chosen = list(rng.choice(with_gt, size=min(n_queries, len(with_gt)), replace=False)) if with_gt else []
    images, titles = [], []
    ranked = submission.sort_values(["query_id", "score"], ascending=[True, False])
    for q in chosen:
        images.append(load_image(queries[q], max_side=256))
        titles.append(f"query {q}")
        rows = ranked[ranked.query_id == q].head(top)
        for r, score in zip(rows.reference_id, rows.score):
            images.append(load_image(references[r], max_side=256))
            titles.append(f"{'COPY ' if (q, r) in truth else ''}{r}  {score:.3f}")
        for _ in range(top - len(rows)):
            images.append(Image.new("RGB", (8, 8), "white"))
            titles.append("")
    return image_grid(images, titles, ncols=top + 1, cell=2.2, suptitle=title)
