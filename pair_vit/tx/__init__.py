"""pair-vit as a ThreatExchange extension: `threatexchange config extensions add pair_vit.tx`.

    codec        the signal string: "pv1.<weights fingerprint>.<URL-safe base64 of float16 vectors>"
    hasher       image bytes -> signal with the shipped descriptor (loaded once), unreadable images -> ""
    calibration  the signal type's settings and descriptor-only calibration (pair_vit/weights/tx_calibration.json)
    index        PairVitIndex: exact float16 faiss index, threshold and top-k queries, picklable for HMA
    signal       PairVitSignal: the SignalType + BytesHasher for photos

Only `pair_vit.bench.tx` (the figures) and tests import this package; nothing else in pair_vit depends on
ThreatExchange. docs/threatexchange.md: the CLI walkthrough, HMA's OMM_CONFIG, the figures.
"""
from threatexchange.extensions.manifest import ThreatExchangeExtensionManifest

from pair_vit.tx.index import PairVitIndex
from pair_vit.tx.signal import PairVitSignal

TX_MANIFEST = ThreatExchangeExtensionManifest(signal_types=(PairVitSignal,))

__all__ = ["TX_MANIFEST", "PairVitSignal", "PairVitIndex"]
