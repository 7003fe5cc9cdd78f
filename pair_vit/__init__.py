"""pair-vit: image copy detection with a descriptor shortlist reranked by a pair Vision Transformer.

Stages, one module each:
    data        image folders, DISC21 layout, robust loading, train/dev split
    edits       the copy-edit battery (AugLy + albumentations) that synthesises queries
    benchmark   builds a DISC21-style benchmark from a folder of photos
    eval        ISC2021 micro-AP, recall@P90, recall@1, submission validation
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
