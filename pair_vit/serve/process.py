"""`pair-vit serve` in a child process on a free loopback port: the end-to-end test, the screenshot command and
the benchmark start the real server this way, and always stop it.

    with ServerProcess(collection, ["--token-file", "token.txt"]) as server:
        httpx.get(server.url + "/health")
        server.kill()            # SIGKILL, as a crash would (the `with` then just reaps it)

Start-up and stopping are bounded loops: the server must answer /health within `start_timeout` seconds (it
loads the models first), and a SIGTERM that does not stop it within `stop_timeout` seconds becomes a SIGKILL.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pair_vit.console serve COLLECTION --port P [args]`, its output in `log` (a file path)."""

    def __init__(self, collection: str | os.PathLike, args: Sequence[str] = (), start_timeout: float = 300,
                 stop_timeout: float = 30, log: str | os.PathLike | None = None):
        self.collection, self.args = str(collection), list(args)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else Path(self.collection).parent / f"serve-{self.port}.log"

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, "-m", "pair_vit.console", "serve", self.collection, "--host", "127.0.0.1",
                   "--port", str(self.port), *self.args]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self._wait_until_healthy()
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout} s: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when the machine or the OOM killer stops the server."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=self.stop_timeout)

    def stop(self) -> int:
        """SIGTERM (uvicorn finishes the requests in flight), SIGKILL if that takes over `stop_timeout` s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=self.stop_timeout)
        return self.process.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
