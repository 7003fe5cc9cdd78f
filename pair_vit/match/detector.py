"""The library API: a copy detector over a reference collection that is saved, loaded and extended in place.

    from pair_vit import CopyDetector
    detector = CopyDetector()                          # the shipped weights and calibration (or checkpoint=...)
    detector.add("photos/")                            # a folder, paths, PIL images, or {id: path or image}
    detector.save("my_index")                          # later: CopyDetector.load("my_index")
    found = detector.match("upload.jpg", k=5)          # DataFrame query_id, reference_id, score, is_copy

`match` runs the stages of `scripts/rerank.py` (`pair_vit.match.query_stages`) with rerank's own functions and
settings: the descriptor shortlist (`index.embed_folder`, `index.search_views`), pair-ViT logits
(`pair.scoring.score_chunk`) and SIFT inliers (`verify.verify_chunk`) chunk by chunk (`cache.run_chunks`), the
calibrated score
(`rerank.Matches.submission`) and the sorted, capped, validated rows (`rerank.finalise`): on the same images and
settings it gives rerank.py's numbers (tests/match/test_detector.py). What differs is where references come from:
their descriptor views live in a faiss `ReferenceIndex` and their pair-ViT trunk tokens and SIFT keypoints in a
`ReferenceStore` (`pair_vit.match.store`), computed once by `add` as rerank computes them on every run (rerank keeps
reference tokens at float16 too, so the numbers agree). `add` embeds only references not yet in the collection;
`remove` rebuilds the faiss index from the stored vectors. A collection built with verify="none" keeps no SIFT
keypoints (a quarter of the bytes per reference) and cannot be matched with SIFT later.

score: the calibrated probability that the query was derived from the reference (higher = more likely a copy);
is_copy: score >= the calibration's precision-90 threshold (0.194 with the shipped weights: on the dev
benchmark 90% of the pairs above it were true copies), or the threshold the caller passes.

Bad input is never fatal to a batch: an unreadable query gets no rows and `result.attrs["skipped"]` maps its id
to the reason; an unreadable reference is skipped by `add` (`AddReport.skipped`). A reference id already in the
collection from another file is refused, naming both. Saving is atomic (`pair_vit.match.store`); `load` refuses
a folder whose save never finished, and a folder built with other weights than the ones given (naming both).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit.config import from_dict, option_like, options_of, to_dict
from pair_vit.match import index as ix
from pair_vit.match import query_stages as stages
from pair_vit.match import rerank
from pair_vit.match.calibration import Calibration
from pair_vit.match.config import RerankConfig
from pair_vit.match.inputs import IN_MEMORY, image_inputs
from pair_vit.match.artefacts import STORE_CHUNK, pair_layout, reference_artefacts
from pair_vit.match.store import DB_FILE, IncompleteIndexError, PairLayout, ReferenceStore

log = logging.getLogger(__name__)

# RerankConfig's options, with rerank's help and defaults: the detector scores as scripts/rerank.py does.
SHARED = ("checkpoint", "descriptor_checkpoint", "views", "subview_penalty", "reference_views",
          "reference_penalty", "token_recall", "token_factory", "token_nprobe", "token_geometry", "token_views",
          "pair_views",
          "verify", "calibration", "factory", "nprobe", "batch_size", "chunk_queries", "amp", "num_workers")
FIXED = ("reference_views", "factory")  # properties of a saved collection: `load` refuses other values
DetectorConfig = dataclasses.make_dataclass("DetectorConfig", [
    ("shortlist", int, option_like(RerankConfig, "k")),
    *options_of(RerankConfig, SHARED),
    ("progress", bool, option_like(RerankConfig, "progress", False)),
], namespace={"__doc__": "How a CopyDetector embeds, shortlists and scores (scripts/rerank.py's options)."})
DetectorConfig.__module__ = __name__

FORMAT = 2  # 1: the store kept reference pixels (pair_vit.match.store)


@dataclasses.dataclass
class AddReport:
    """What `CopyDetector.add` did: ids added, ids already in the collection (same file), images skipped."""

    added: list[str]
    already: list[str]
    skipped: data.SkipReport

    def __str__(self) -> str:
        n = len(self.added)
        text = f"added {n} reference{'s' * (n != 1)} ({len(self.already)} already in the collection"
        return text + (f"; {self.skipped.summary()})" if len(self.skipped) else ")")


class CopyDetector:
    """Decide which references each query image was copied from (see the module docstring).

    `CopyDetector(**options)`: a new, empty collection; options are `DetectorConfig` fields (`checkpoint`,
    `descriptor_checkpoint`, `shortlist`, `amp`, ...), defaults as scripts/rerank.py's.
    `CopyDetector.load(folder, **options)`: a saved collection with the settings it was saved with, `options`
    overriding the per-match ones.
    """

    def __init__(self, settings: Any = None, **options: Any):
        values = {**(to_dict(settings) if settings is not None else {}), **options}
        for name in ("checkpoint", "descriptor_checkpoint"):  # saved with the collection: absolute
            if values.get(name):
                values[name] = str(Path(values[name]).resolve())
        self.settings = from_dict(DetectorConfig, values, source="CopyDetector settings")
        _check_settings(self.settings)
        self._load_models()
        self.index: ix.ReferenceIndex | None = None
        self.store = ReferenceStore()
        self.folder: Path | None = None
        self._tokens = None  # token_recall.TokenIndex over the stored tokens, built at the first match that votes

    def _load_models(self) -> None:
        from pair_vit.descriptor.model import load_descriptor

        cfg = self.rerank_config()
        path = rerank.resolve_checkpoint(cfg)
        self.descriptor = load_descriptor(path)[0].eval()
        self.pair, _, self.calibration = rerank.load_pair(cfg)
        rerank.check_calibration(self.calibration, self.settings.verify, self.settings.token_recall)
        pair_path = Path(cfg.checkpoint) if cfg.checkpoint else rerank.SHIPPED_WEIGHTS
        self.weights = {"descriptor": {"checkpoint": str(path.resolve()),
                                       "fingerprint": ix.model_fingerprint(self.descriptor)},
                        "pair": {"checkpoint": str(pair_path.resolve()),
                                 "fingerprint": ix.model_fingerprint(self.pair)}}

    def rerank_config(self, **fields: Any) -> RerankConfig:
        """The scripts/rerank.py settings this detector scores with (plus `fields`, e.g. queries=...)."""
        s = self.settings
        return RerankConfig(k=s.shortlist, progress=s.progress, **{n: getattr(s, n) for n in SHARED},
                                   **fields)

    # ------------------------------------------------------------------ the collection

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    def __contains__(self, ref_id: str) -> bool:
        return self.index is not None and ref_id in self.index

    @property
    def ids(self) -> list[str]:
        """Reference ids, in the order they were added."""
        return [] if self.index is None else self.index.ids

    @property
    def threshold(self) -> float:
        """The default `is_copy` threshold: the calibration's precision-90 score (0.5 if it has none)."""
        p90 = self.calibration.threshold_p90
        return 0.5 if p90 is None else float(p90)

    def __repr__(self) -> str:
        return f"CopyDetector({len(self)} references, folder={self.folder}, threshold={self.threshold:.3f})"

    def add(self, images: Any, ids: Sequence[str] | None = None) -> AddReport:
        """Add references: a folder (nested; id = file stem), image paths, PIL images (with `ids`, else image_0,
        image_1, ...) or a mapping id -> path or PIL image. Only references not in the collection are embedded; an
        id already there from the same file is left alone, from another file refused (naming both)."""
        report = data.SkipReport()
        with image_inputs(images, ids, report) as given:
            new, already = self._unknown(given.paths, given.sources)
            added = self._add(new, given.sources, report) if new else []
        result = AddReport(added, already, report)
        log.info("%s", result)
        return result

    def _unknown(self, paths: dict[str, Path], sources: dict[str, str]) -> tuple[dict[str, Path], list[str]]:
        new, already = {}, []
        for ref_id, path in paths.items():
            old = self.store.sources.get(ref_id)
            if old is None:
                new[ref_id] = path
            elif old == sources[ref_id] and old != IN_MEMORY:
                already.append(ref_id)
            else:
                raise data.DuplicateIdError(f"reference id {ref_id!r} is already in the collection, from {old}; "
                                            f"{sources[ref_id]} has the same id: rename it, or remove {ref_id!r} "
                                            f"first")
        return new, already

    def _add(self, paths: dict[str, Path], sources: dict[str, str], report: data.SkipReport) -> list[str]:
        """Embed `paths`, store their artefacts, add them to the index. Returns the ids added."""
        s = self.settings
        ids, vectors, owner = ix.embed_folder(self.descriptor, paths, s.batch_size, s.amp, s.reference_views,
                                              report, s.num_workers, progress=s.progress and "references")
        starts = np.searchsorted(owner, np.arange(len(ids) + 1))  # image j owns rows starts[j]:starts[j + 1]
        position = {ref_id: j for j, ref_id in enumerate(ids)}
        kept: list[int] = []
        try:
            artefacts = reference_artefacts(self.pair, self.settings, ids, vectors, starts, paths, sources, report)
            for chunk in _chunks(artefacts, STORE_CHUNK):
                self.store.put(chunk)
                kept.extend(position[r.ref_id] for r in chunk)
            if kept:
                self._index_add([ids[j] for j in kept], vectors, starts, kept)
                if self._tokens is not None:  # a built token index takes the new references' stored tokens
                    self._tokens.add([ids[j] for j in kept], self._stored_tokens([ids[j] for j in kept]))
        except BaseException:
            self.store.remove([ids[j] for j in kept])
            raise
        return [ids[j] for j in kept]

    @property
    def pair_layout(self) -> PairLayout:
        """What the store keeps of a reference for the pair model: trunk tokens (hybrid) or pixels."""
        return pair_layout(self.pair)

    def _index_add(self, ref_ids: list[str], vectors: np.ndarray, starts: np.ndarray, kept: list[int]) -> None:
        rows = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in kept])
        owner = np.repeat(np.arange(len(kept)), [starts[j + 1] - starts[j] for j in kept])
        if self.index is None:
            s = self.settings
            meta = ix.reference_metadata(self.descriptor, s.reference_views)
            self.index = ix.ReferenceIndex.build(ref_ids, vectors[rows], s.factory, meta, s.nprobe, owner)
        else:
            self.index.add(ref_ids, vectors[rows], owner)

    def remove(self, ids: str | Sequence[str]) -> None:
        """Remove references by id (all or none: an unknown id is refused). Rebuilds the faiss index from the
        stored vectors of the others (the same values: nothing is embedded again)."""
        import faiss

        ids = [ids] if isinstance(ids, str) else list(ids)
        if not ids:
            return
        unknown = [i for i in ids if i not in self]
        if unknown:
            raise ValueError(f"not in the collection: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        gone = set(ids)
        kept = [i for i in self.index.ids if i not in gone]
        vectors = self.store.vectors(kept, self.index.dim)
        empty = faiss.clone_index(self.index.index)
        empty.reset()  # keeps what a trained index (IVF, PQ) learnt
        index = ix.ReferenceIndex(empty, [], self.index.factory, self.index.metadata, self.index.nprobe)
        index.add(kept, np.concatenate([vectors[i] for i in kept]) if kept else np.zeros((0, index.dim), np.float32),
                  np.repeat(np.arange(len(kept)), [len(vectors[i]) for i in kept]))
        self.store.remove(ids)
        self.index = index
        self._tokens = None  # rebuilt from the store at the next match that votes

    # ------------------------------------------------------------------ saving and loading

    def save(self, folder: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """Write the collection to `folder` (default: the one it was loaded from or last saved to), atomically:
        the faiss index under a fresh name, then one commit of the reference store naming it."""
        folder = Path(folder) if folder is not None else self.folder
        if folder is None:
            raise ValueError("save: no folder given, and this collection was never saved or loaded")
        same = self.folder is not None and folder.resolve() == self.folder.resolve()
        if not same and (folder / DB_FILE).exists() and not overwrite:
            raise FileExistsError(f"{folder} holds another saved collection; pass overwrite=True to replace it")
        if self.index is None:
            raise ValueError("nothing to save: add references first")
        name = f"index-{uuid.uuid4().hex[:12]}"
        self.index.save(folder / name)
        self.store.save(folder, {"format": FORMAT, "index_dir": name, "settings": to_dict(self.settings),
                                 "pair_layout": self.pair_layout.to_meta(), "keypoints": self.settings.verify != "none",
                                 "weights": self.weights, "calibration": self.calibration.to_dict(),
                                 "n_references": len(self), "saved": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for old in folder.glob("index-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, **options: Any) -> CopyDetector:
        """The collection saved in `folder`. `options` override the saved per-match settings (`shortlist`,
        `amp`, `pair_views`, `calibration`, ...); other weights or reference views than the saved ones are
        refused (IndexMismatchError), and so is a folder without a complete save (IncompleteIndexError)."""
        folder = Path(folder)
        store = ReferenceStore.open(folder)
        try:
            meta = store.meta()
            saved = meta["settings"]
            for name in FIXED:
                if name in options and options[name] != saved[name]:
                    raise ix.IndexMismatchError(f"{folder} holds a collection with {name}={saved[name]!r}, not "
                                                f"{options[name]!r}; build a new one for that")
            detector = cls(**{**saved, **options})
            _check_weights(meta["weights"], detector.weights, folder)
            if detector.settings.verify != "none" and not meta["keypoints"]:
                raise ix.IndexMismatchError(f"{folder} was built with verify='none' and keeps no SIFT keypoints: match "
                                            f"it with verify='none', or build a new collection to verify with SIFT")
            if "calibration" not in options:
                detector.calibration = Calibration.from_dict(meta["calibration"])
            index_dir = folder / meta["index_dir"]
            if not (index_dir / ix.META_FILE).is_file():
                raise IncompleteIndexError(f"{folder}: the faiss index {index_dir.name} it names is missing")
            detector.index = ix.ReferenceIndex.load(
                index_dir, expected_model_args=ix.model_args_of(detector.descriptor),
                expected_fingerprint=detector.weights["descriptor"]["fingerprint"],
                expected_reference_views=saved["reference_views"])
            detector.index.nprobe = detector.settings.nprobe
            store.check(detector.index.ids, folder)
        except BaseException:
            store.close()
            raise
        detector.store.close()
        detector.store, detector.folder = store, folder
        return detector

    def info(self) -> dict[str, Any]:
        """Counts, settings, weights and sizes on disk (bytes) of the collection."""
        index_bytes = 0
        if self.folder is not None:
            name = self.store.meta().get("index_dir", "")
            index_bytes = sum(p.stat().st_size for p in (self.folder / name).glob("index.*.faiss")) if name else 0
        return {"folder": str(self.folder) if self.folder else None, "references": len(self),
                "vectors": 0 if self.index is None else self.index.n_rows,
                "factory": self.settings.factory, "reference_views": self.settings.reference_views,
                "threshold": self.threshold, "calibration": self.calibration.fitted_on or "identity",
                "weights": self.weights, "saved_index_bytes": index_bytes, "saved_store_bytes": self.store.file_size(),
                "settings": to_dict(self.settings)}

    # ------------------------------------------------------------------ matching

    def match(self, queries: Any, k: int = 5, threshold: float | None = None,
              ids: Sequence[str] | None = None) -> pd.DataFrame:
        """Match query images (a path, a folder, PIL images, a list or a mapping id -> path or image; ids as in
        `add`) against the collection.

        Returns query_id, reference_id, score (calibrated, higher = more likely a copy), is_copy (score >=
        `threshold`, default `self.threshold`): each query's best `k` candidates (at most `shortlist`) by score.
        Unreadable queries get no rows: `result.attrs["skipped"]` maps their ids to the reason;
        `result.attrs["seconds"]` gives the wall time of each stage (descriptor shortlist, token recall, pair ViT,
        SIFT verification)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not len(self):
            raise ValueError("the collection is empty: add references before matching")
        report = data.SkipReport()
        seconds = dict.fromkeys(("shortlist", "token_recall", "pair", "verify"), 0.0)  # per call: matches may overlap
        with image_inputs(queries, ids, report, what="query") as given:
            images = stages.query_images(self.pair, given.paths, report)
            readings: dict = {}  # query id -> {(h, w): trunk tokens}, from token recall for the pair stage
            shortlist = stages.shortlist(self, given.paths, report, seconds, images, readings)
            rows = stages.rescore(self, shortlist, report, seconds, images, readings) if len(shortlist) else None
        if rows is None or not len(rows):
            result = ix.empty_submission().astype({"score": np.float64})
        else:
            result = rerank.finalise(rerank.Matches(rows, report, self.calibration).submission(),
                                     min(k, self.settings.shortlist))
        threshold = self.threshold if threshold is None else float(threshold)
        result = result.assign(is_copy=result.score.to_numpy() >= threshold)
        result.attrs["skipped"] = given.skipped(report)
        result.attrs["threshold"] = threshold
        result.attrs["seconds"] = seconds
        return result

    def token_index(self, settings):
        """The token-recall index of every reference, built from the stored tokens at the first match that votes."""
        from pair_vit.match import token_recall as tr

        if self._tokens is None:
            self._tokens = tr.index_from(list(self.index.ids), self._stored_tokens, settings.factory, STORE_CHUNK)
        return self._tokens

    def _stored_tokens(self, ids: list[str]) -> np.ndarray:
        """(N, C, Gh, Gw) float16 stored tokens of `ids`, in order."""
        stored = self.store.pair_inputs(ids, self.pair_layout)
        return np.stack([stored[i].numpy() for i in ids])


# ----------------------------------------------------------------------------- helpers


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_settings(s: Any) -> None:
    from pair_vit.pair.scoring import expand_views

    if s.shortlist < 1 or s.batch_size < 1 or s.chunk_queries < 1 or s.num_workers < 0:
        raise ValueError("shortlist, batch_size and chunk_queries must be >= 1, num_workers >= 0")
    expand_views(s.pair_views)


def _check_weights(saved: dict, now: dict, folder: Path) -> None:
    for part, option in (("descriptor", "descriptor_checkpoint"), ("pair", "checkpoint")):
        if saved[part]["fingerprint"] != now[part]["fingerprint"]:
            raise ix.IndexMismatchError(
                f"{folder} was built with the {part} weights {saved[part]['checkpoint']} (fingerprint "
                f"{saved[part]['fingerprint']}), not {now[part]['checkpoint']} (fingerprint "
                f"{now[part]['fingerprint']}): load it with {option}= those weights, or build a new collection")
