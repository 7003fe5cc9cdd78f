"""Training state both trainers share: threads, the accelerator, resuming (checkpoints, RNG states), the LR
schedule, metrics.csv and the look-alike table of hard negatives."""
from __future__ import annotations

import csv
import logging
import math
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from pair_vit.checkpoint import compare_configs, load_checkpoint
from pair_vit.config import to_dict

log = logging.getLogger(__name__)

RNG_KINDS = ("torch", "numpy", "python")


def set_torch_threads(threads: int, processes: int = 0) -> None:
    """Torch threads: `threads` if set; else, given `processes`, the usable cores split between them; else
    torch's default is left alone."""
    if threads:
        torch.set_num_threads(threads)
    elif processes:
        # `accelerate launch` sets OMP_NUM_THREADS=1 for a single process: use the cores we were given instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // processes))


def start_accelerator():
    """An `accelerate.Accelerator` whose processes wait up to 3 hours for each other (while one scans photos or
    builds a cache); processes other than the main one log errors only. Mixed precision is not accelerate's:
    the trainers wrap their forward passes in `pair_vit.precision.autocast`, bf16 only where it is native."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    acc = Accelerator(mixed_precision="no",
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))])
    if not acc.is_main_process:
        logging.getLogger("pair_vit").setLevel(logging.ERROR)
    return acc


def broadcast(acc, value: Any) -> Any:
    """`value` of the main process, on every process of `acc` (an Accelerator)."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def checkpoint_to_resume(path: Path, resume: bool, overwrite: bool, kind: str) -> dict[str, Any] | None:
    """The checkpoint at `path` when resuming (None otherwise); an existing one is never overwritten silently."""
    if not resume:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: pass --resume to continue that run or --overwrite to start afresh")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} not found")
    return load_checkpoint(path, kind=kind)


def prepare_output(output_dir: str | Path, resume: bool, overwrite: bool, kind: str, accelerator,
                   outputs: Sequence[str]) -> tuple[Path, dict[str, Any] | None]:
    """(path of output_dir/checkpoint.pt, the checkpoint to resume or None). A fresh run over an old one
    (--overwrite) first removes the old run's `outputs` and checkpoint, so no metrics.csv row of it survives."""
    out = Path(output_dir)
    path = out / "checkpoint.pt"
    ckpt = checkpoint_to_resume(path, resume, overwrite, kind)
    if ckpt is None and path.is_file():
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in ("checkpoint.pt", "metrics.csv", "skipped.csv", *outputs):
                (out / name).unlink(missing_ok=True)
    return path, ckpt


def config_diffs(ckpt: Mapping[str, Any], cfg: Any, keys: Iterable[str]) -> list[str]:
    """One line per field of `keys` whose value in `cfg` differs from the checkpoint's saved config."""
    return compare_configs(ckpt["config"], to_dict(cfg), keys)


def refuse_resume(path: Path, diffs: Sequence[str]) -> None:
    """Raise a ValueError naming every difference between the saved run and this one, if there is any."""
    if diffs:
        raise ValueError(f"cannot resume from {path}: settings differ from the saved run: {'; '.join(diffs)}. "
                         f"Use the saved values, another --output-dir, or --overwrite to start afresh")


def rng_states(kinds: Sequence[str] = RNG_KINDS) -> dict[str, Any]:
    """This process's RNG states of `kinds` (torch, numpy, python), as tensors and plain values."""
    states: dict[str, Any] = {}
    if "torch" in kinds:
        states["torch"] = torch.get_rng_state()
    if "numpy" in kinds:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]
    if "python" in kinds:
        states["python"] = random.getstate()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore the RNG states `rng_states` captured (only the kinds present in `states`)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    if "python" in states:
        random.setstate(_as_tuples(states["python"]))


def init_from(model: torch.nn.Module, path: str | os.PathLike, kind: str, model_args: Mapping[str, Any],
              defaults: Mapping[str, Any] | None = None, same_weights: Sequence[str] = ()) -> None:
    """Fine-tuning: load the weights of checkpoint `path` (of `kind`) into `model`, refusing another
    architecture (any difference in `model_args`, ignoring the `pretrained` initialisation and the
    `same_weights` arguments, which change how a model is used but not its weights) with its names.
    `defaults` fill the architecture arguments a checkpoint written before they existed does not record."""
    saved = load_checkpoint(path, kind=kind)
    saved_args = {**(defaults or {}), **saved["model_args"]}
    keys = sorted((set(saved_args) | set(model_args)) - {"pretrained", *same_weights})
    diffs = [f"{k}: saved {saved_args.get(k)!r}, now {model_args.get(k)!r}" for k in keys
             if _as_tuples(saved_args.get(k)) != _as_tuples(model_args.get(k))]
    if diffs:
        raise ValueError(f"cannot initialise from {path}: another architecture: {'; '.join(diffs)}")
    model.load_state_dict(saved["model_state"])


def restore(ckpt: Mapping[str, Any], model, optimizer, scheduler, accelerator) -> int:
    """Load a training checkpoint's weights, optimiser, scheduler and this process's RNG states (saved as
    extra["rng"][process], one per process of the saving run); returns the step to continue from."""
    model.load_state_dict(ckpt["model_state"])
    extra = ckpt["extra"]
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra.get("rng") or []
    if extra.get("world_size") == accelerator.num_processes and accelerator.process_index < len(rngs):
        set_rng_states(rngs[accelerator.process_index])
    elif accelerator.is_main_process:
        log.warning("checkpoint made with %s processes, now %d: RNG states not restored",
                    extra.get("world_size"), accelerator.num_processes)
    return int(ckpt["step"])


def make_scheduler(optimizer, cfg):
    """Warm-up then cosine LR schedule over cfg.max_steps. Not given to `accelerator.prepare`: its wrapper
    would step the schedule once per process per step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.01) -> float:
    """LR factor after `step` steps: linear warm-up towards 1 over `warmup` steps, then a cosine down to
    `min_ratio` at step `total` (and flat after it)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples random.getstate gave (a checkpoint may hand back lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def append_metrics(path: Path, row: Mapping[str, Any], columns: Sequence[str] | None = None) -> None:
    """Append `row` to the CSV at `path`, with a header if the file is new (a resumed run appends to it).

    `columns` fixes the header (missing values are left empty); by default it is the first row's keys.
    """
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or row), restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def nearest_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """(N, D) L2-normalised vectors -> (N, min(k, N-1)) int64: each row's most similar other rows, best first.

    Exact, blockwise (O(N^2 D) time, ~256 MB of similarities at a time): fine up to ~10^5 photos.
    """
    n = len(vectors)
    k, block = min(k, n - 1), max(1, 2**26 // max(n, 1))
    out = np.zeros((n, max(k, 0)), np.int64)
    if k <= 0:
        return out
    for start in range(0, n, block):
        sims = vectors[start:start + block] @ vectors.T  # (b, N)
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # never one's own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(top, order, axis=1)
    return out
