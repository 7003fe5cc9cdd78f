"""What every script shares: logging, config parsing, and user errors as one clear line (exit code 2)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence

from pair_vit.config import parse_config

# Errors caused by the user's input (paths, options, files): no traceback, just the message.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def main(config_cls: type, run: Callable[[Any], Any], argv: Sequence[str] | None = None,
         description: str | None = None) -> Any:
    """Parse `config_cls` from argv (+ --config YAML) and call `run(cfg)`; user errors exit 2 with a message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU variant it did not find
    cfg = parse_config(config_cls, argv, description)
    try:
        return run(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
