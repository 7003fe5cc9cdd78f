"""A readers-writer lock on a file: many matches at once, or one addition or removal alone.

    lock = CollectionLock(folder / ".serve.lock")
    with lock.read(): ...    # matches: shared
    with lock.write(): ...   # additions, removals and their save: exclusive

Each acquisition opens the lock file anew and `flock`s it: locks held through different open files exclude each
other whether they belong to two threads of one process or to two processes, so the same lock serialises writes
against matches inside one server and across `--workers` processes. The kernel drops a lock when its holder
dies, so a killed server never leaves the collection locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


class CollectionLock:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @contextlib.contextmanager
    def _held(self, mode: int) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)  # blocks: callers run in worker threads, never on the event loop
            yield
        finally:
            os.close(fd)  # closing the file releases its lock

    def read(self) -> contextlib.AbstractContextManager[None]:
        """Shared: any number of readers, no writer."""
        return self._held(fcntl.LOCK_SH)

    def write(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive: no reader, no other writer."""
        return self._held(fcntl.LOCK_EX)
