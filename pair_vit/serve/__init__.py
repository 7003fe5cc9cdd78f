"""`pair-vit serve`: an HTTP service and a review page over a saved collection (docs/serve.md).

    app.py       the routes (Starlette), errors as JSON, the body limit, bearer auth
    service.py   Collection: the CopyDetector behind the routes, its lock, saves before acknowledging
    uploads.py   uploaded images and parameters checked before any model runs
    explain.py   where in a query each candidate was found (the pair model's token correspondences)
    lock.py      the readers-writer lock file (threads and processes)
    config.py    ServeConfig (what `pair-vit serve` parses)
    run.py       serve(): the app under uvicorn, one or several worker processes
    static/      the review page (plain HTML, CSS, JS)
"""
from pair_vit.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve", "build"]


def __getattr__(name: str):
    """`serve` and `build`, imported on first use: `import pair_vit.serve` stays light (no Starlette, no torch)."""
    if name in ("serve", "build"):
        from pair_vit.serve import run

        return getattr(run, name)
    raise AttributeError(f"module 'pair_vit.serve' has no attribute {name!r}")
