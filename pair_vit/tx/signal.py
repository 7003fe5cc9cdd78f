"""`PairVitSignal`: the shipped descriptor as a ThreatExchange signal type (name "pair_vit", photos).

    PairVitSignal.hash_from_file(Path("photo.jpg"))       # "pv1.3f0f7d14.<base64>" ("" if unreadable)
    PairVitSignal.compare_hash(reference_signal, query_signal)   # SignalComparisonResult(match, distance)
    PairVitSignal.validate_signal_str(text)               # normalised signal, or ValueError saying why

The signal format is `pair_vit.tx.codec`; hashing is `pair_vit.tx.hasher`; matching at scale is
`pair_vit.tx.index.PairVitIndex`. Distance = 1 - merged cosine similarity (lower = more likely a copy); the
default threshold is the descriptor-only calibration's precision-90 cut on the dev benchmark
(`pair_vit.tx.calibration`).
"""
from __future__ import annotations

import logging
import pathlib
import typing as t

from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.photo import PhotoContent
from threatexchange.signal_type import signal_base

from pair_vit.tx import hasher
from pair_vit.tx.index import PairVitDistance, PairVitIndex, merged_similarity

log = logging.getLogger(__name__)


class PairVitSignal(signal_base.SignalType, signal_base.BytesHasher):
    """pair-vit's global image descriptor (EfficientNet-Lite0 + GeM, 256-d per view) as a signal.

    Unlike PDQ it survives crops, overlays, colour edits and re-encoding far better (docs/threatexchange.md), and
    the distance maps to a calibrated copy probability (`probability`). It carries no reference pixels, so the
    pair ViT and SIFT verification of `pair_vit.CopyDetector` cannot run on it: confirm matches where the media
    is kept.
    """

    @classmethod
    def get_content_types(cls) -> t.List[t.Type[ContentType]]:
        return [PhotoContent]

    @classmethod
    def get_index_cls(cls) -> t.Type[PairVitIndex]:
        return PairVitIndex

    @classmethod
    def validate_signal_str(cls, signal_str: str) -> str:
        """The signal without surrounding whitespace; codec.SignalError (a ValueError) if it is malformed,
        truncated, corrupt or made by other descriptor weights."""
        hasher.decode(signal_str)
        return signal_str.strip()

    @classmethod
    def compare_hash(cls, hash1: str, hash2: str,
                     distance_threshold: t.Optional[float] = None) -> signal_base.SignalComparisonResult:
        """hash1: the indexed (reference) signal, hash2: the query signal. Match iff distance <= threshold
        (default: the calibrated precision-90 cut, `default_threshold()`)."""
        threshold = default_threshold() if distance_threshold is None else distance_threshold
        distance = max(0.0, 1.0 - merged_similarity(hasher.decode(hash1), hasher.decode(hash2)))
        return signal_base.SignalComparisonResult(distance <= threshold, PairVitDistance(distance))

    @classmethod
    def hash_from_bytes(cls, bytes_: bytes) -> str:
        return hasher.hash_bytes(bytes_)

    @classmethod
    def hash_from_file(cls, file: pathlib.Path) -> str:
        """Like hash_from_bytes, naming the file in the logged reason when it cannot be used."""
        try:
            content = pathlib.Path(file).read_bytes()
        except OSError as err:
            log.warning("pair_vit: no signal for %s: cannot read file (%s)", file, err.strerror or err)
            return ""
        return hasher.hash_bytes(content, str(file))

    @staticmethod
    def get_examples() -> t.List[str]:
        """Signals of two demo photos (pair_vit/assets/demo), stored with the calibration."""
        return list(hasher.settings().examples)


def default_threshold() -> float:
    """The default match distance: the calibrated precision-90 cut of the dev benchmark."""
    return hasher.settings().distance_threshold


def probability(distance: float) -> float:
    """A match distance -> calibrated probability that the pair is a copy (descriptor-only fit on dev)."""
    return float(hasher.settings().probability(distance))
