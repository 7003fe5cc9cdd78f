"""What a saved detector keeps of each reference besides its faiss rows, in one SQLite file per folder.

    store = ReferenceStore()                      # a new collection (pending rows in a private temp file)
    store.put([StoredReference(ref_id, source, vectors, tensor, xy, desc), ...])
    store.tensors(["a", "b"], half_size); store.keypoints(["a"]); store.vectors(["a"], dim)
    store.save(folder, meta)                      # the commit point of `CopyDetector.save`
    store = ReferenceStore.open(folder)           # refuses a folder whose first save never finished

Per reference (`StoredReference`): its descriptor views (float32 (V, D), whole image first: the faiss index can be
rebuilt exactly after a removal, whatever its factory), its pair-ViT input (uint8 (3, h, w): the image decoded and
resized as `pair_vit.pair.scoring.TensorCache` does for references) and its SIFT keypoints (float32 xy (n, 2),
float16 RootSIFT (n, 128): `pair_vit.match.verify.keypoints`, n <= 800). Matching reads these instead of decoding
reference images, so a saved collection no longer needs its image files and a query costs no reference decoding
or keypoint extraction. On disk: about 37 KB (shipped pair ViT, 112 x 112) + 264 bytes per keypoint + 1 KB per
descriptor view.

Atomicity: rows added or removed since the last save are pending (added rows in a temporary database under TMPDIR,
about 150 KB per reference; removed ids in memory). `save` into the folder the store was opened from (or last
saved to) applies them and the new `meta` in ONE SQLite transaction: a process killed before its commit leaves the
previous save intact (SQLite rolls the journal back on the next open). `save` into another folder writes a
complete database under a temporary name and renames it into place. `meta` names the faiss index folder of the
save, written before the commit, so a save's rows, metadata and index always belong together.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

DB_FILE = "references.sqlite"
STORE_FORMAT = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                 source TEXT NOT NULL, vectors BLOB NOT NULL, tensor BLOB NOT NULL,
                                 xy BLOB NOT NULL, descriptors BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "id, source, vectors, tensor, xy, descriptors"


class IncompleteIndexError(ValueError):
    """A folder holds no complete saved detector (never saved, a first save killed midway, or files missing)."""


@dataclass
class StoredReference:
    """One reference as matching reads it (see the module docstring for shapes)."""

    ref_id: str
    source: str
    vectors: np.ndarray  # (V, D) float32 descriptor views, whole image first
    tensor: np.ndarray  # (3, h, w) uint8 pair-ViT input
    xy: np.ndarray  # (n, 2) float32 keypoint positions
    descriptors: np.ndarray  # (n, 128) float16 RootSIFT

    def row(self) -> tuple:
        return (self.ref_id, self.source, _blob(self.vectors, np.float32), _blob(self.tensor, np.uint8),
                _blob(self.xy, np.float32), _blob(self.descriptors, np.float16))


def _blob(array: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


class ReferenceStore:
    """Committed rows in FOLDER/references.sqlite (none for a new collection), pending ones beside them."""

    def __init__(self, folder: str | Path | None = None):
        self._tmp = Path(tempfile.mkdtemp(prefix="pair_vit_store_"))
        weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        self._pending_path = self._tmp / "pending.sqlite"
        self.pending = _connect(self._pending_path, create=True)
        self.db = _connect(Path(folder) / DB_FILE) if folder is not None else None
        self.folder = Path(folder) if folder is not None else None
        self.removed: set[str] = set()  # committed ids removed since the last save
        self.sources: dict[str, str] = {}  # every live id -> where its image came from
        if self.db is not None:
            self.sources = dict(self.db.execute("SELECT id, source FROM refs ORDER BY seq"))

    @classmethod
    def open(cls, folder: str | Path) -> ReferenceStore:
        """The store saved in `folder`; IncompleteIndexError if there is none or its save never finished."""
        path = Path(folder) / DB_FILE
        if not path.is_file():
            raise IncompleteIndexError(f"no saved detector in {folder} ({DB_FILE} not found: never saved there, or "
                                       f"its first save was interrupted)")
        try:
            store = cls(folder)
            meta = store.meta()
        except sqlite3.DatabaseError as err:
            raise IncompleteIndexError(f"{path} is not a readable detector database ({err})") from None
        if "index_dir" not in meta:
            store.close()
            raise IncompleteIndexError(f"{path} holds no committed save (no index recorded)")
        return store

    def close(self) -> None:
        """Close the databases and drop the pending rows (the store is unusable afterwards)."""
        self.pending.close()
        if self.db is not None:
            self.db.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ metadata

    def meta(self) -> dict[str, Any]:
        """The metadata of the last save (empty for a new collection)."""
        if self.db is None:
            return {}
        return {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")}

    def check(self, ids: Sequence[str], where: Any) -> None:
        """Refuse a save whose rows are not exactly the references of its faiss index."""
        if set(ids) != set(self.sources) or len(ids) != len(self.sources):
            raise IncompleteIndexError(f"{where}: the faiss index holds {len(ids)} references, {DB_FILE} "
                                       f"{len(self.sources)}, not the same ones; the folder is damaged")

    # ------------------------------------------------------------------ rows

    def put(self, refs: Iterable[StoredReference]) -> None:
        """Add references (pending until `save`); their ids must not be live already."""
        refs = list(refs)
        with self.pending:
            self.pending.executemany(f"INSERT INTO refs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                                     [r.row() for r in refs])
        self.sources.update((r.ref_id, r.source) for r in refs)

    def remove(self, ids: Iterable[str]) -> None:
        """Drop live references (pending ones at once, committed ones at the next `save`)."""
        ids = list(ids)
        with self.pending:
            self.pending.executemany("DELETE FROM refs WHERE id = ?", [(i,) for i in ids])
        for ref_id in ids:
            self.sources.pop(ref_id)
            if self.db is not None and self.db.execute("SELECT 1 FROM refs WHERE id = ?", (ref_id,)).fetchone():
                self.removed.add(ref_id)

    def _rows(self, ids: Iterable[str], column: str) -> dict[str, bytes]:
        """id -> the blob `column` of each live id (pending rows first, then committed ones)."""
        wanted = [i for i in dict.fromkeys(ids) if i in self.sources]
        found: dict[str, bytes] = {}
        for conn in (self.pending, self.db):
            todo = [i for i in wanted if i not in found and (conn is self.pending or i not in self.removed)]
            for start in range(0, len(todo), 500):  # SQLite caps the number of parameters of a statement
                part = todo[start:start + 500]
                sql = f"SELECT id, {column} FROM refs WHERE id IN ({','.join('?' * len(part))})"
                found.update(conn.execute(sql, part) if conn is not None else ())
        return found

    def vectors(self, ids: Iterable[str], dim: int) -> dict[str, np.ndarray]:
        """id -> (V, dim) float32 descriptor views."""
        return {i: np.frombuffer(b, np.float32).reshape(-1, dim) for i, b in self._rows(ids, "vectors").items()}

    def tensors(self, ids: Iterable[str], half_size: Sequence[int]) -> dict[str, Any]:
        """id -> (3, h, w) uint8 torch tensor, the pair-ViT input of the reference."""
        import torch

        shape = (3, int(half_size[0]), int(half_size[1]))
        out = {}
        for ref_id, blob in self._rows(ids, "tensor").items():
            if len(blob) != int(np.prod(shape)):
                raise IncompleteIndexError(f"reference {ref_id!r} was stored for a pair ViT of another input size "
                                           f"({len(blob)} bytes, {shape} expected)")
            out[ref_id] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).reshape(shape)
        return out

    def keypoints(self, ids: Iterable[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """id -> [(xy (n, 2) float32, RootSIFT (n, 128) float16)]: a `verify.KeypointCache` entry (one variant)."""
        ids = list(ids)
        xy, desc = self._rows(ids, "xy"), self._rows(ids, "descriptors")
        return {i: [(np.frombuffer(xy[i], np.float32).reshape(-1, 2),
                     np.frombuffer(desc[i], np.float16).reshape(-1, 128))] for i in xy}

    # ------------------------------------------------------------------ saving

    def save(self, folder: str | Path, meta: dict[str, Any]) -> None:
        """Commit every pending change and `meta` into FOLDER/references.sqlite (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.db is not None and self.folder is not None and folder.resolve() == self.folder.resolve():
            self._apply(self.db, meta)
        else:
            tmp = folder / f".{DB_FILE}.{uuid.uuid4().hex[:12]}.tmp"
            try:
                fresh = _connect(tmp, create=True)
                if self.db is not None:
                    self.db.backup(fresh)
                self._apply(fresh, meta)
                fresh.close()
                os.replace(tmp, folder / DB_FILE)
            finally:
                tmp.unlink(missing_ok=True)
            if self.db is not None:
                self.db.close()
            self.db, self.folder = _connect(folder / DB_FILE), folder
        self._reset_pending()

    def _apply(self, conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        """One transaction: removed rows out, pending rows in, metadata replaced."""
        conn.execute("ATTACH DATABASE ? AS pending", (str(self._pending_path),))
        try:
            with conn:
                conn.executemany("DELETE FROM main.refs WHERE id = ?", [(i,) for i in sorted(self.removed)])
                conn.execute(f"INSERT INTO main.refs ({_COLUMNS}) SELECT {_COLUMNS} FROM pending.refs ORDER BY seq")
                conn.execute("DELETE FROM main.meta")
                conn.executemany("INSERT INTO main.meta (key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in {**meta, "store_format": STORE_FORMAT}.items()])
        finally:
            conn.execute("DETACH DATABASE pending")

    def _reset_pending(self) -> None:
        self.pending.close()
        self._pending_path.unlink(missing_ok=True)
        self.pending = _connect(self._pending_path, create=True)
        self.removed.clear()

    def file_size(self) -> int:
        """Bytes of the committed database file (0 before the first save)."""
        return (self.folder / DB_FILE).stat().st_size if self.folder is not None else 0


def _connect(path: Path, create: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False)
    if create:
        conn.executescript(SCHEMA)
    return conn
