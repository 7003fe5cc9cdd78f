"""`pair-vit serve COLLECTION`: load the collection once per process, build the app, hand it to uvicorn.

    serve("my_collection", ServeConfig(port=8000, token_file="token.txt"), {"amp": True})

With `workers` > 1 uvicorn starts that many processes and each builds its own app from the environment
(`app_from_environment`): the collection folder, the config (the token FILE, never the token) and the detector
options travel as JSON in PAIR_VIT_SERVE.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pair_vit.config import from_dict, to_dict
from pair_vit.serve.app import create_app
from pair_vit.serve.config import ServeConfig
from pair_vit.serve.service import Collection

ENV = "PAIR_VIT_SERVE"


def read_token(token_file: str) -> str | None:
    """The bearer token in `token_file` (surrounding whitespace dropped), None without one; a ValueError for an
    empty file."""
    if not token_file:
        return None
    token = Path(token_file).read_text().strip()
    if not token:
        raise ValueError(f"token file {token_file} is empty: write the bearer token in it")
    return token


def build(collection: str, cfg: ServeConfig, options: dict[str, Any] | None = None):
    """The ASGI app over `collection` (loaded now; a new collection if nothing is saved there)."""
    cfg.check()
    return create_app(Collection(collection, options), cfg, read_token(cfg.token_file))


def app_from_environment():
    """uvicorn's factory in each worker process when `workers` > 1."""
    spec = json.loads(os.environ[ENV])
    return build(spec["collection"], from_dict(ServeConfig, spec["config"]), spec["options"])


def serve(collection: str, cfg: ServeConfig, options: dict[str, Any] | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    cfg.check()
    read_token(cfg.token_file)  # refuse a bad token file before any model loads
    common = {"host": cfg.host, "port": cfg.port, "log_level": cfg.log_level}
    if cfg.workers == 1:
        uvicorn.run(build(collection, cfg, options), **common)
        return
    os.environ[ENV] = json.dumps({"collection": str(collection), "config": to_dict(cfg), "options": options or {}})
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=cfg.workers, **common)
