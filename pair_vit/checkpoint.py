"""Self-describing checkpoints shared by every trainer (descriptor, pair ViT).

A checkpoint is one torch file holding a plain dict:

    format      CHECKPOINT_FORMAT (bumped if the layout below changes)
    kind        what network it holds: "descriptor", "pair_vit", ...
    model_args  everything needed to rebuild the network (the builder's arguments)
    model_state the network's state_dict
    config      the resolved training config (a plain dict)
    step        optimisation steps done
    extra       trainer-specific state (optimizer, scheduler, RNG states, data hash, ...) or {}
    git_sha     commit of the repo the code ran from ("unknown" outside a git checkout)
    created     UTC timestamp, ISO 8601
    pair_vit    package version;  torch: torch version

Writes are atomic (temp file in the same folder + os.replace): a killed run never leaves a half file.
Loading uses `weights_only=True`, so a checkpoint can hold tensors and plain python values only, and a
file from elsewhere cannot run code when loaded. Every problem with a file (missing, truncated, not a
checkpoint, another kind) is a `CheckpointError`, a ValueError whose message names the file.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

import pair_vit
from pair_vit.io import atomic_path

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "kind", "model_args", "model_state")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (both a ValueError and a FileNotFoundError)."""


_GIT_SHA: str | None = None


def git_sha() -> str:
    """Commit of the repo this package runs from (with "-dirty" if it has uncommitted changes), or "unknown"."""
    global _GIT_SHA
    if _GIT_SHA is None:
        _GIT_SHA = _read_git_sha(Path(pair_vit.__file__).resolve().parent)
    return _GIT_SHA


def _read_git_sha(folder: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
    except Exception:  # no git, not a checkout, timeout...: provenance is best-effort, never fatal
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        dirty = False
    return sha + ("-dirty" if dirty else "") if sha else "unknown"


def state_dict_to(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copy of `state` with floating-point tensors cast to `dtype` (e.g. fp16 for released weights).

    Integer buffers (BatchNorm's num_batches_tracked) are kept as they are.
    """
    return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state.items()}


def save_checkpoint(path: str | os.PathLike, *, kind: str, model_args: Mapping[str, Any],
                    model_state: Mapping[str, torch.Tensor] | None = None, config: Mapping[str, Any] | None = None,
                    step: int = 0, extra: Mapping[str, Any] | None = None,
                    model: torch.nn.Module | None = None) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns `path`.

    Pass the weights as `model_state` (a state_dict) or as `model` (its state_dict is taken, unwrapped
    from DDP/accelerate wrappers if needed). Tensors are moved to the CPU.
    """
    if (model_state is None) == (model is None):
        raise TypeError("save_checkpoint needs exactly one of model_state= or model=")
    if model is not None:
        model_state = getattr(model, "module", model).state_dict()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": str(kind),
        "model_args": dict(model_args),
        "model_state": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": dict(config or {}),
        "step": int(step),
        "extra": dict(extra or {}),
        "git_sha": git_sha(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pair_vit": pair_vit.__version__,
        "torch": str(torch.__version__),  # TorchVersion is not a plain str: weights_only loading refuses it
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a checkpoint is shared like any output
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; refuse (CheckpointError, a ValueError) a bad file or another kind."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code objects...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a pair-vit checkpoint "
                              f"({type(err).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a pair-vit checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a pair-vit checkpoint: missing {missing}")
    if int(ckpt["format"]) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt['format']}, newer than this code "
                              f"understands ({CHECKPOINT_FORMAT}): update pair-vit")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {ckpt['kind']!r} model, expected {kind!r}")
    ckpt.setdefault("config", {})
    ckpt.setdefault("step", 0)
    ckpt.setdefault("extra", {})
    return ckpt


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """One line per key in `keys` whose value differs between two configs ("key: saved X, now Y").

    Used to refuse resuming a run with an incompatible config. Tuples and lists compare equal when their
    items do (a config read back from YAML has lists where the live one may have tuples).
    """
    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    missing = object()
    diffs = []
    for key in keys:
        a, b = saved.get(key, missing), current.get(key, missing)
        if norm(a) != norm(b):
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{key}: saved {show(a)}, now {show(b)}")
    return diffs
