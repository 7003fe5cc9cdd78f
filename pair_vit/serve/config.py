"""ServeConfig: what `pair-vit serve COLLECTION` parses (one `--kebab-case` flag per field, pair_vit.config)."""
from __future__ import annotations

from dataclasses import dataclass

from pair_vit.config import opt


@dataclass
class ServeConfig:
    """How `pair-vit serve` listens, who may write, and what an upload may weigh."""

    host: str = opt("127.0.0.1", "address to bind (loopback unless told otherwise)")
    port: int = opt(8000, "TCP port (0: any free port)")
    token_file: str = opt("", "file holding the bearer token the writing routes (POST/DELETE /references) need; "
                              "empty: no token needed")
    workers: int = opt(1, "server processes, each with its own copy of the models (writes are serialised across "
                          "them by a lock file in the collection)")
    max_request_mb: float = opt(32.0, "largest request body accepted, in MB (413 beyond)")
    max_files: int = opt(64, "most images in one request")
    max_pixels: int = opt(50_000_000, "largest image accepted, in pixels, read from its header before decoding "
                                      "(413 beyond: a decompression bomb is refused unread)")
    default_k: int = opt(5, "rows per query when a request gives no k")
    log_level: str = opt("info", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug"))

    def check(self) -> None:
        """Refuse settings the server cannot run with (a ValueError naming the option)."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("workers", "max_files", "max_pixels", "default_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_request_mb > 0:
            raise ValueError(f"max_request_mb must be > 0, got {self.max_request_mb}")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)
