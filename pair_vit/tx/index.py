"""`PairVitIndex`: a ThreatExchange `SignalTypeIndex` of pair-vit signals over faiss.

    index = PairVitIndex.build([(signal, metadata), ...])      # or PairVitIndex() then add()/add_all()
    index.query(signal)                   # matches with distance <= index.threshold (the calibrated P90 cut)
    index.query_threshold(signal, 0.3)    # matches with distance <= 0.3
    index.query_top_k(signal, 5)          # the 5 nearest signals, whatever their distance
    blob = pickle.dumps(index)            # what HMA stores in Postgres; refused on load by other weights

Distance = 1 - merged similarity (lower = more likely a copy). A signal packs V views of its image (the whole
image first); the merged similarity of an indexed (reference) signal and a query signal is the best cosine over
all pairs of their views, each sub-view's similarity first lowered by its side's penalty (the whole image is
trusted more: `pair_vit.descriptor.views.SUBVIEW_PENALTY` / `REFERENCE_SUBVIEW_PENALTY`). With one view per
signal it is the plain cosine.

Storage: faiss `IndexScalarQuantizer` in float16 with inner product, i.e. exactly the float16 values the signal
carries (exact search, no training, no loss beyond the signal's own). Per distinct signal it holds V x D x 2
bytes of codes plus 12 bytes of row bookkeeping per view (`memory_bytes()`), and in Python a 16-byte digest of
the signal (deduplication) and its metadata list. Identical signals are stored once, their metadata listed
together (as threatexchange's PDQ index does).
"""
from __future__ import annotations

import hashlib
import typing as t
import weakref

import numpy as np
from threatexchange.signal_type.index import IndexMatchUntyped, SignalSimilarityInfoWithSingleDistance, \
    SignalTypeIndex
from threatexchange.signal_type.index import T as IndexT

from pair_vit.tx import hasher

STATE_VERSION = 2


class PairVitDistance(SignalSimilarityInfoWithSingleDistance[float]):
    """1 - merged cosine similarity of two pair-vit signals, in [0, 2]; lower = more likely a copy."""

    def pretty_str(self) -> str:
        return f"{self.distance:.4f}"


PairVitMatch = IndexMatchUntyped[PairVitDistance, IndexT]


def view_penalties(n_views: int, penalty: float) -> np.ndarray:
    """(n_views,) float32: 0 for the whole image (view 0), `penalty` for each sub-view."""
    out = np.full(n_views, penalty, np.float32)
    out[0] = 0.0
    return out


def merged_similarity(reference: np.ndarray, query: np.ndarray) -> float:
    """(Vr, D) and (Vq, D) unit vectors of two signals -> their merged similarity (higher = more likely a copy)."""
    cfg = hasher.settings()
    sims = reference @ query.T - view_penalties(len(reference), cfg.reference_penalty)[:, None] \
        - view_penalties(len(query), cfg.query_penalty)[None, :]
    return float(sims.max())


def _new_faiss(dim: int):
    import faiss

    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)


def _key(signal: str) -> bytes:
    """16-byte digest of a signal: identical signals share one row set, and the index does not keep the ~0.7-3.8 KB
    signal strings in memory (nor in its pickle)."""
    return hashlib.blake2b(signal.strip().encode("ascii", "replace"), digest_size=16).digest()


def _reset(faiss_index) -> None:
    faiss_index.reset()


class PairVitIndex(SignalTypeIndex[IndexT]):
    """Exact float16 faiss index of pair-vit signals; see the module docstring."""

    # Class-wide default distance threshold; None = the calibrated precision-90 cut. An HMA deployment that
    # wants another default subclasses with a number here (threatexchange issue #1873).
    default_threshold: t.Optional[float] = None

    def __init__(self, entries: t.Iterable[t.Tuple[str, IndexT]] = (), *, threshold: t.Optional[float] = None):
        cfg = hasher.settings()
        fallback = self.default_threshold if self.default_threshold is not None else cfg.distance_threshold
        self.threshold = float(fallback if threshold is None else threshold)
        self.fingerprint = cfg.fingerprint
        self._init_storage(_new_faiss(cfg.dim))
        self.add_all(entries)

    def _init_storage(self, faiss_index, row_signal=None, row_penalty=None, deduper=None, entries=None) -> None:
        self._faiss = faiss_index
        self._row_signal = np.zeros(0, np.int64) if row_signal is None else row_signal  # faiss row -> signal
        self._row_penalty = np.zeros(0, np.float32) if row_penalty is None else row_penalty
        self._deduper: t.Dict[bytes, int] = {} if deduper is None else deduper  # _key(signal) -> signal id
        self._entries: t.List[t.List[IndexT]] = [] if entries is None else entries  # signal id -> metadata
        self._max_views = int(np.bincount(self._row_signal).max()) if len(self._row_signal) else 1
        # faiss memory is native: free it when the index is garbage-collected, not at interpreter exit
        self._finalizer = weakref.finalize(self, _reset, faiss_index)

    def __len__(self) -> int:
        """Number of distinct signals."""
        return len(self._entries)

    # ------------------------------------------------------------------ adding

    def add(self, signal_str: str, entry: IndexT) -> None:
        self.add_all([(signal_str, entry)])

    def add_all(self, entries: t.Iterable[t.Tuple[str, IndexT]]) -> None:
        """Add (signal, metadata) pairs; an invalid signal raises codec.SignalError before anything is added."""
        cfg = hasher.settings()
        new_vectors, new_owner = [], []
        pending = [(_key(signal), signal, entry) for signal, entry in entries]
        decoded = {key: hasher.decode(signal) for key, signal, _ in pending if key not in self._deduper}
        for key, _, entry in pending:
            if key not in self._deduper:
                self._deduper[key] = len(self._entries)
                self._entries.append([])
                new_vectors.append(decoded[key])
                new_owner.append(np.full(len(decoded[key]), self._deduper[key], np.int64))
            self._entries[self._deduper[key]].append(entry)
        if new_vectors:
            self._faiss.add(np.ascontiguousarray(np.concatenate(new_vectors), dtype=np.float32))
            self._row_signal = np.concatenate([self._row_signal, *new_owner])
            self._max_views = max(self._max_views, *(len(v) for v in new_vectors))
            self._row_penalty = np.concatenate(
                [self._row_penalty, *(view_penalties(len(v), cfg.reference_penalty) for v in new_vectors)])

    # ------------------------------------------------------------------ querying

    def query(self, query: str) -> t.Sequence[PairVitMatch[IndexT]]:
        """Every indexed entry whose signal is within `self.threshold` of `query`, nearest first."""
        return self.query_threshold(query, self.threshold)

    def query_threshold(self, query: str, threshold: float) -> t.Sequence[PairVitMatch[IndexT]]:
        """Every indexed entry whose signal is within distance `threshold` of `query`, nearest first."""
        best = self._range(hasher.decode(query), 1.0 - float(threshold))
        return self._matches(sorted(best.items(), key=lambda kv: (-kv[1], kv[0])))

    def query_top_k(self, query: str, k: int) -> t.Sequence[PairVitMatch[IndexT]]:
        """The entries of the `k` nearest distinct signals, nearest first, whatever their distance."""
        if k < 1 or not len(self):
            return []
        vectors = hasher.decode(query)
        q_pen = view_penalties(len(vectors), hasher.settings().query_penalty)
        # Enough rows that k distinct signals survive merging (a signal owns up to MAX_VIEWS rows).
        rows = min(self._faiss.ntotal, k * self._max_views + k)
        sims, ids = self._faiss.search(np.ascontiguousarray(vectors), rows)
        best = self._merge(sims - q_pen[:, None], ids)
        return self._matches(sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k])

    def _range(self, vectors: np.ndarray, min_similarity: float) -> t.Dict[int, float]:
        """Signal id -> merged similarity, for signals with merged similarity >= min_similarity."""
        if not len(self):
            return {}
        # k-NN search with a growing k until every view's k-th neighbour is below the cut: exact, and far
        # faster than faiss's range_search on a scalar-quantised index (measured: docs/threatexchange.md).
        vectors = np.ascontiguousarray(vectors)
        rows = min(self._faiss.ntotal, 32)
        while True:
            sims, ids = self._faiss.search(vectors, rows)
            if rows == self._faiss.ntotal or sims[:, -1].max() < min_similarity:
                break
            rows = min(self._faiss.ntotal, rows * 4)
        # penalties only lower similarities, so they are applied after the search, then the cut again
        q_pen = view_penalties(len(vectors), hasher.settings().query_penalty)
        best = self._merge(sims - q_pen[:, None], ids)
        return {sid: s for sid, s in best.items() if s >= min_similarity}

    def _merge(self, sims: np.ndarray, rows: np.ndarray) -> t.Dict[int, float]:
        """(Q, n) similarities of rows (-1 = none) -> signal id -> best similarity minus the row's penalty."""
        valid = rows >= 0
        rows, sims = rows[valid], sims[valid] - self._row_penalty[rows[valid]]
        best: t.Dict[int, float] = {}
        for sid, s in zip(self._row_signal[rows].tolist(), sims.tolist()):
            if s > best.get(sid, -np.inf):
                best[sid] = s
        return best

    def _matches(self, ranked: t.List[t.Tuple[int, float]]) -> t.List[PairVitMatch[IndexT]]:
        return [IndexMatchUntyped(PairVitDistance(max(0.0, 1.0 - s)), entry)
                for sid, s in ranked for entry in self._entries[sid]]

    # ------------------------------------------------------------------ size, pickling

    def memory_bytes(self) -> int:
        """Bytes held for the vectors and row bookkeeping (faiss codes + row -> signal, penalty); the Python
        objects (signal digests, metadata lists) come on top."""
        code = self._faiss.sa_code_size() * self._faiss.ntotal
        return int(code + self._row_signal.nbytes + self._row_penalty.nbytes)

    def __getstate__(self) -> dict:
        import faiss

        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "threshold": self.threshold,
                "faiss": faiss.serialize_index(self._faiss), "row_signal": self._row_signal,
                "row_penalty": self._row_penalty, "deduper": self._deduper, "entries": self._entries}

    def __setstate__(self, state: dict) -> None:
        import faiss

        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("pickled PairVitIndex of an unknown format: rebuild it from its signals")
        expected = hasher.expected_fingerprint()
        if state["fingerprint"] != expected:
            raise ValueError(f"pickled PairVitIndex was built from signals of other descriptor weights "
                             f"({state['fingerprint']}, these are {expected}): rebuild it from re-hashed images")
        self.fingerprint, self.threshold = state["fingerprint"], state["threshold"]
        self._init_storage(faiss.deserialize_index(state["faiss"]), state["row_signal"], state["row_penalty"],
                           state["deduper"], state["entries"])

    def dispose(self) -> None:
        self._finalizer()
