"""What a saved detector keeps of each reference besides its faiss rows, in one SQLite file per folder.

    store = ReferenceStore()                      # a new collection (pending rows in a private temp file)
    store.put([StoredReference(ref_id, source, vectors, pair, thumbnail, xy, desc), ...])
    store.pair_inputs(["a", "b"], layout); store.keypoints(["a"]); store.vectors(["a"], dim); store.thumbnail("a")
    store.save(folder, meta)                      # the commit point of `CopyDetector.save`
    store = ReferenceStore.open(folder)           # refuses a folder whose first save never finished, or an old format

Per reference (`StoredReference`):
- its descriptor views (float32 (V, D), whole image first: the faiss index can be rebuilt exactly after a removal,
  whatever its factory; 1 KB per view);
- its pair-ViT side (`pair`): for the hybrid pair ViT the reference's trunk tokens, float16 (C, Gh, Gw) (Lite0 at
  160 px: 112 x 10 x 10, 22.4 KB), all a localizing pair model reads of a reference; for the pixel pair ViT its
  input, uint8 (3, h, w). `PairLayout` says which, and is checked on every read;
- a JPEG thumbnail (longest side `THUMBNAIL_SIDE`, ~5 KB) for people: the review page shows it, no model reads it;
- its SIFT keypoints (float32 xy (n, 2), float16 RootSIFT (n, 128): `pair_vit.match.verify.keypoints`, n <= 800,
  264 bytes each) while the collection verifies with SIFT; none (n = 0) for a collection built with verify none.
Matching reads these instead of decoding reference images, so a saved collection no longer needs its image files
and a query costs no reference decoding, trunk pass or keypoint extraction.

Format 1 (before 2026-12-07) kept each reference's pixels instead of its tokens: `open` refuses it with the
commands that rebuild it (`StoreFormatError`).

Atomicity: rows added or removed since the last save are pending (added rows in a temporary database under TMPDIR;
removed ids in memory). `save` into the folder the store was opened from (or last saved to) applies them and the
new `meta` in ONE SQLite transaction: a process killed before its commit leaves the previous save intact (SQLite
rolls the journal back on the next open). `save` into another folder writes a complete database under a temporary
name and renames it into place. `meta` names the faiss index folder of the save, written before the commit, so a
save's rows, metadata and index always belong together.
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
STORE_FORMAT = 2  # 1: reference pixels instead of tokens (refused)
THUMBNAIL_SIDE = 160  # longest side of the JPEG thumbnail kept for the review page
SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                 source TEXT NOT NULL, vectors BLOB NOT NULL, pair BLOB NOT NULL,
                                 thumbnail BLOB NOT NULL, xy BLOB NOT NULL, descriptors BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "id, source, vectors, pair, thumbnail, xy, descriptors"


class IncompleteIndexError(ValueError):
    """A folder holds no complete saved detector (never saved, a first save killed midway, or files missing)."""


class StoreFormatError(ValueError):
    """A folder saved by a pair-vit whose store layout this one does not read: rebuild it from the images."""


@dataclass(frozen=True)
class PairLayout:
    """What the `pair` column holds: "tokens" (float16) or "pixels" (uint8), and its per-reference shape."""

    kind: str
    shape: tuple[int, ...]

    @property
    def dtype(self):
        return np.float16 if self.kind == "tokens" else np.uint8

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape)}

    @classmethod
    def from_meta(cls, value: dict[str, Any]) -> "PairLayout":
        return cls(value["kind"], tuple(int(n) for n in value["shape"]))


@dataclass
class StoredReference:
    """One reference as matching reads it (see the module docstring for shapes)."""

    ref_id: str
    source: str
    vectors: np.ndarray  # (V, D) float32 descriptor views, whole image first
    pair: np.ndarray  # (C, Gh, Gw) float16 trunk tokens, or (3, h, w) uint8 pixels (PairLayout)
    thumbnail: bytes  # JPEG, longest side THUMBNAIL_SIDE
    xy: np.ndarray  # (n, 2) float32 keypoint positions (n = 0 without SIFT)
    descriptors: np.ndarray  # (n, 128) float16 RootSIFT

    def row(self) -> tuple:
        pair_dtype = np.uint8 if self.pair.dtype == np.uint8 else np.float16
        return (self.ref_id, self.source, _blob(self.vectors, np.float32), _blob(self.pair, pair_dtype),
                self.thumbnail, _blob(self.xy, np.float32), _blob(self.descriptors, np.float16))


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
        if meta.get("store_format") != STORE_FORMAT:
            store.close()
            raise StoreFormatError(
                f"{folder} was saved in store format {meta.get('store_format')}, which kept each reference's pixels; "
                f"this pair-vit reads format {STORE_FORMAT} (each reference's pair-ViT tokens). Rebuild it from the "
                f"reference images: `pair-vit index add NEW_FOLDER IMAGES...` (or CopyDetector().add(images)"
                f".save(NEW_FOLDER))")
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
            self.pending.executemany(f"INSERT INTO refs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
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

    def pair_inputs(self, ids: Iterable[str], layout: PairLayout) -> dict[str, Any]:
        """id -> the pair-ViT side of the reference as a torch tensor of `layout.shape`: float16 tokens, or uint8
        pixels (see the module docstring)."""
        import torch

        size = int(np.prod(layout.shape)) * np.dtype(layout.dtype).itemsize
        out = {}
        for ref_id, blob in self._rows(ids, "pair").items():
            if len(blob) != size:
                raise IncompleteIndexError(f"reference {ref_id!r} was stored for another pair model ({len(blob)} "
                                           f"bytes, {layout.kind} {layout.shape} expected)")
            out[ref_id] = torch.from_numpy(np.frombuffer(blob, layout.dtype).reshape(layout.shape).copy())
        return out

    def thumbnail(self, ref_id: str) -> bytes | None:
        """The JPEG thumbnail of a live reference, or None if it is not in the collection."""
        return self._rows([ref_id], "thumbnail").get(ref_id)

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
