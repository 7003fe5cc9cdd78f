"""The served collection: one `CopyDetector` per server process, loaded once, its writes serialised.

    collection = Collection(folder, options)     # CopyDetector.load(folder), or a new one if nothing is saved
    collection.match({"q": path}, k=5)           # {"matches": [...], "skipped": {...}, "threshold": t}
    collection.add({"cat": path})                # {"added": [...], "already": [...], "skipped": {...}}, saved
    collection.remove("cat")                     # saved

Every method is a thin call of the detector's, wrapped in the collection's `CollectionLock`: matches share it,
an addition or removal holds it alone from its first change to the end of its `save` (atomic: one SQLite
commit, `CopyDetector.save`), so a match never sees a half-added collection and nothing is acknowledged before
it is on disk. A write that fails after changing the detector reloads the last save, so memory and disk agree.

Several server processes (`--workers`) each hold a detector: the lock file serialises them too, and a process
that finds a save newer than the one it holds (another process wrote) reloads it before reading or writing.
"""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from pair_vit import data
from pair_vit.serve import explain
from pair_vit.serve.errors import ServeError
from pair_vit.serve.lock import CollectionLock

log = logging.getLogger(__name__)

LOCK_FILE = ".serve.lock"
STAGING = ".uploads"  # additions are staged here under a content address: the same bytes give the same source


class Collection:
    """A CopyDetector over `folder` (module docstring); `options` are DetectorConfig fields."""

    def __init__(self, folder: str | Path, options: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.options = dict(options or {})
        self.lock = CollectionLock(self.folder / LOCK_FILE)
        self._reloading = threading.Lock()
        with self.lock.read():
            self._load()

    # ------------------------------------------------------------------ keeping up with the saved collection

    def _load(self) -> None:
        from pair_vit.match.detector import CopyDetector
        from pair_vit.match.store import DB_FILE

        if (self.folder / DB_FILE).exists():
            self.detector = CopyDetector.load(self.folder, **self.options)
        else:  # a new collection: saved by its first addition
            self.detector = CopyDetector(**self.options)
        self.generation = self._saved_generation()

    def _saved_generation(self) -> str | None:
        """The faiss index folder the last save names (None before the first save): every save names a new one."""
        from pair_vit.match.store import DB_FILE, ReferenceStore

        if self.detector.folder is not None:
            return self.detector.store.meta().get("index_dir")
        if not (self.folder / DB_FILE).exists():
            return None
        store = ReferenceStore.open(self.folder)
        try:
            return store.meta().get("index_dir")
        finally:
            store.close()

    def _current(self):
        """The detector, reloaded first if another process saved since this one loaded. Call under the lock."""
        if self._saved_generation() != self.generation:
            with self._reloading:
                if self._saved_generation() != self.generation:
                    log.info("%s was saved by another process: reloading it", self.folder)
                    self._load()
        return self.detector

    # ------------------------------------------------------------------ reading

    def health(self) -> dict[str, Any]:
        detector = self.detector
        return {"status": "ok", "references": len(detector), "threshold": detector.threshold,
                "weights": {part: {"fingerprint": w["fingerprint"], "checkpoint": Path(w["checkpoint"]).name}
                            for part, w in detector.weights.items()}}

    def ids(self, offset: int, limit: int) -> dict[str, Any]:
        with self.lock.read():
            ids = self._current().ids
        return {"total": len(ids), "offset": offset, "limit": limit, "ids": ids[offset:offset + limit]}

    def match(self, queries: dict[str, Path], k: int, threshold: float | None,
              correspondences: bool = False) -> dict[str, Any]:
        """`CopyDetector.match` as JSON: rows best first per query (score: calibrated, higher = more likely a
        copy), skipped queries and the threshold used; with `correspondences`, where in each query each candidate
        was found (`explain.correspondences`)."""
        with self.lock.read():
            detector = self._current()
            if not len(detector):
                raise ServeError(409, "the collection is empty: add references first (POST /references)")
            found = detector.match(queries, k=k, threshold=threshold)
            out = {"matches": [_row(r) for r in found.itertuples(index=False)], "skipped": found.attrs["skipped"],
                   "threshold": found.attrs["threshold"]}
            if correspondences:
                candidates = found.groupby("query_id", sort=False).reference_id.apply(list)
                out["correspondences"] = {q: explain.correspondences(detector, queries[q], refs)
                                          for q, refs in candidates.items()}
        return out

    def reference_image(self, ref_id: str) -> bytes:
        """The JPEG thumbnail the collection keeps of a reference (longest side 160 px)."""
        with self.lock.read():
            detector = self._current()
            if ref_id not in detector:
                raise ServeError(404, f"no reference {ref_id!r} in the collection")
            jpeg = explain.reference_thumbnail(detector, ref_id)
        if jpeg is None:
            raise ServeError(404, f"the collection keeps no thumbnail of {ref_id!r}")
        return jpeg

    # ------------------------------------------------------------------ writing

    def add(self, uploads: list) -> dict[str, Any]:
        """Add checked uploads (`uploads.Upload`), save, then return what was added, already there, skipped."""
        with self.lock.write():
            detector = self._current()
            staged = self._stage(uploads)
            try:
                report = self._changed(lambda: detector.add(staged), lambda r: bool(r.added))
            finally:
                shutil.rmtree(self.folder / STAGING, ignore_errors=True)
            names = {str(path): ref_id for ref_id, path in staged.items()}
            return {"added": report.added, "already": report.already,
                    "skipped": {names.get(str(p), Path(p).stem): reason for p, reason in report.skipped},
                    "references": len(detector)}

    def remove(self, ref_id: str) -> dict[str, Any]:
        with self.lock.write():
            detector = self._current()
            if ref_id not in detector:
                raise ServeError(404, f"no reference {ref_id!r} in the collection")
            self._changed(lambda: detector.remove(ref_id), lambda _: True)
            return {"removed": ref_id, "references": len(detector)}

    def _stage(self, uploads: list) -> dict[str, Path]:
        """id -> a copy of the upload at STAGING/<sha256>/<id>: its source, as the detector records it, is the
        same for the same bytes under the same id (`already`), and differs for other bytes (refused: 409)."""
        staged = {}
        for upload in uploads:
            path = self.folder / STAGING / upload.sha256[:32] / upload.image_id
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upload.path, path)
            staged[upload.image_id] = path
        return staged

    def _changed(self, change, needs_save):
        """Run `change()` on the detector, then save if `needs_save(result)`; on failure reload the last save."""
        try:
            result = change()
            if needs_save(result):
                self.detector.save(self.folder)
                self.generation = self._saved_generation()
            return result
        except data.DuplicateIdError as err:  # `add` refuses these before changing anything
            raise ServeError(409, str(err)) from None
        except BaseException:
            log.exception("changing %s failed: reloading its last save", self.folder)
            self._load()
            raise


def _row(row) -> dict[str, Any]:
    return {"query_id": str(row.query_id), "reference_id": str(row.reference_id), "score": float(row.score),
            "is_copy": bool(row.is_copy)}
