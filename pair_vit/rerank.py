"""Matching: shortlist candidate references for every query with the descriptor, then (later) rerank them
with the pair ViT, and write a matching-track submission `query_id,reference_id,score`.

    python scripts/rerank.py --queries Q/ --references R/ --output sub.csv --descriptor-only --k 10

Only the descriptor stage exists so far: `--descriptor-only` writes its shortlist itself (score = cosine
similarity, optionally background-normalised). `--index DIR` keeps the reference embeddings in a faiss index
on disk: a later run embeds only the references that are not in it yet and saves it back; an index built
with another descriptor (architecture, weights or dimension) is refused.

Under `accelerate launch` (any number of processes, CPU or GPU) references, background photos and queries are
split between the processes and their results gathered, so every process builds the same index and the main
process writes one submission, identical to a single-process run.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit import eval as evaluation
from pair_vit import index as ix
from pair_vit.config import opt, save_config
from pair_vit.io import atomic_path
from pair_vit.multiview import VIEWS

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "descriptor.pt"


@dataclass
class RerankConfig:
    """Match query images against reference images and write a submission CSV (query_id,reference_id,score)."""

    queries: str = opt("", "folder of query images (nested or not; id = file stem)")
    references: str = opt("", "folder of reference images")
    output: str = opt("", "submission CSV to write")
    descriptor_only: bool = opt(False, "submit the descriptor shortlist itself (stage 1, no pair-ViT reranking)")
    k: int = opt(50, "shortlist size: candidate references per query")
    max_per_query: int = opt(0, "at most this many rows per query in the submission (0: k)")
    descriptor_checkpoint: str = opt("", "descriptor checkpoint; empty: the weights shipped in the package "
                                         "(pair_vit/weights/descriptor.pt)")
    index: str = opt("", "folder of a reference index to reuse and extend (created if absent); empty: in memory")
    factory: str = opt("Flat", "faiss index_factory string for a new reference index: Flat (exact), "
                               "IVF{nlist},PQ{m}, HNSW32, ...")
    nprobe: int = opt(16, "IVF lists visited per query (IVF factories only)")
    views: str = opt("full", "query views: full (1 descriptor per query), halves (5), grid (14); "
                             "merged by max similarity", choices=VIEWS)
    batch_size: int = opt(64, "descriptors computed per forward pass")
    amp: bool = opt(True, "bf16 autocast for the descriptor (--no-amp: float32)")
    num_workers: int = opt(1, "image-decoding worker processes per process (0: decode in the main process)")
    background: str = opt("", "folder of background photos (not in the benchmark, e.g. training photos); "
                              "enables score normalisation: similarity - beta * mean similarity of the query "
                              "to its n nearest background photos")
    background_n: int = opt(1, "score normalisation: number of nearest background photos averaged")
    background_beta: float = opt(1.0, "score normalisation: weight of the background term")
    overwrite: bool = opt(False, "replace an existing output file")
    progress: bool = opt(True, "progress bars")


# ----------------------------------------------------------------------------- processes


class Processes:
    """One process, or the processes of an `accelerate launch`: split work, gather results."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it): without cpu=True a
            # CPU-only launch silently runs every process alone on all the work.
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or \
                not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            if self.state.num_processes != int(os.environ["WORLD_SIZE"]):
                raise RuntimeError(f"accelerate started {self.state.num_processes} process(es), "
                                   f"WORLD_SIZE={os.environ['WORLD_SIZE']}")
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    @property
    def device(self):
        import torch

        return self.state.device if self.state else torch.device("cpu")

    def share(self, images: dict[str, Path]) -> dict[str, Path]:
        """This process's contiguous share of `images` (all of them in a single process)."""
        if self.state is None or not images:
            return images
        with self.state.split_between_processes(list(images.items())) as mine:
            return dict(mine)

    def gather(self, items: list) -> list:
        """Concatenate every process's list, in process order (the input list in a single process)."""
        if self.state is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def embed_split(procs: Processes, model, images: dict[str, Path], report: data.SkipReport, views: str,
                cfg: RerankConfig, desc: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """embed_folder over all processes: each embeds its share; everyone gets the concatenated result."""
    ids, vectors, owner = ix.embed_folder(model, procs.share(images), cfg.batch_size, cfg.amp, views, report,
                                          cfg.num_workers, progress=cfg.progress and procs.is_main and desc)
    if procs.state is None:
        return ids, vectors, owner
    parts = procs.gather([(ids, vectors, owner)])
    all_ids: list[str] = []
    for part_ids, _, part_owner in parts:
        part_owner += len(all_ids)
        all_ids.extend(part_ids)
    return all_ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


# ----------------------------------------------------------------------------- steps


def resolve_checkpoint(cfg: RerankConfig) -> Path:
    path = Path(cfg.descriptor_checkpoint) if cfg.descriptor_checkpoint else DEFAULT_CHECKPOINT
    if not path.is_file():
        if not cfg.descriptor_checkpoint:
            raise FileNotFoundError(f"no descriptor weights shipped in the package yet ({path} not found): pass "
                                    f"--descriptor-checkpoint DESC.pt, or train one with "
                                    f"scripts/train_descriptor.py")
        raise FileNotFoundError(f"descriptor checkpoint not found: {path}")
    return path


def check_config(cfg: RerankConfig) -> None:
    if not cfg.descriptor_only:
        raise ValueError("the pair-ViT reranker is not available yet: pass --descriptor-only to write the "
                         "descriptor shortlist as the submission")
    for name in ("queries", "references", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.k < 1 or cfg.max_per_query < 0 or cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ValueError("--k and --batch-size must be >= 1, --max-per-query and --num-workers >= 0")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists; pass --overwrite to replace it")


def reference_index(procs: Processes, model, references: dict[str, Path], report: data.SkipReport,
                    cfg: RerankConfig) -> tuple[ix.ReferenceIndex, int]:
    """Load (and check) or start the reference index, embed the references missing from it, save it back.
    Returns (index, number of references embedded by this run)."""
    index = None
    if cfg.index and (Path(cfg.index) / ix.META_FILE).is_file():
        index = ix.ReferenceIndex.load(cfg.index, expected_model_args=ix.model_args_of(model),
                                       expected_fingerprint=ix.model_fingerprint(model))
        index.nprobe = cfg.nprobe
        stale = len(set(index.ids) - set(references))
        if stale:
            log.warning("%d references in index %s are not in %s; they can still be matched", stale, cfg.index,
                        cfg.references)
    todo = {i: p for i, p in references.items() if index is None or i not in index}
    ids, vectors, _ = embed_split(procs, model, todo, report, "full", cfg, "references")
    if index is None:
        index = ix.ReferenceIndex.build(ids, vectors, cfg.factory, ix.index_metadata(model), nprobe=cfg.nprobe)
    else:
        index.add(ids, vectors)
    if len(index) == 0:
        raise ValueError(f"no usable reference images in {cfg.references}")
    if cfg.index and procs.is_main and (ids or not (Path(cfg.index) / ix.META_FILE).is_file()):
        index.save(cfg.index)
        log.info("saved reference index %s (%d references, %d new)", cfg.index, len(index), len(ids))
    return index, len(ids)


def finalise(submission: pd.DataFrame, max_per_query: int) -> pd.DataFrame:
    """Sorted, capped and validated submission: no duplicate pair, finite scores, <= max_per_query per query."""
    submission = submission.sort_values(["query_id", "score", "reference_id"], ascending=[True, False, True],
                                        kind="stable")
    submission = submission.groupby("query_id", sort=False).head(max_per_query).reset_index(drop=True)
    checked = evaluation.validate_submission(submission, "submission")
    per_query = checked.groupby("query_id").size()
    if len(per_query) and per_query.max() > max_per_query:
        raise AssertionError(f"{per_query.idxmax()} has {per_query.max()} rows > {max_per_query}")
    return checked


def write_outputs(submission: pd.DataFrame, report: data.SkipReport, cfg: RerankConfig) -> None:
    out = Path(cfg.output)
    with atomic_path(out) as tmp:
        submission.to_csv(tmp, index=False, float_format="%.8g")
    skipped = out.with_name(out.name + ".skipped.csv")
    if len(report):
        report.write_csv(skipped)
        log.warning("%s; listed in %s", report.summary(), skipped)
    elif skipped.exists():
        skipped.unlink()  # left by an earlier run of the output we just replaced
    save_config(cfg, out.with_name(out.name + ".config.yaml"))


# ----------------------------------------------------------------------------- run


def run(cfg: RerankConfig, load_model: Callable[[Path], Any] | None = None) -> pd.DataFrame:
    """Write the submission described by `cfg` and return it (every process returns it)."""
    start = time.perf_counter()
    check_config(cfg)
    procs = Processes()
    references = data.list_images(cfg.references)
    if not references:
        raise ValueError(f"no reference images in {cfg.references}")
    queries = data.list_images(cfg.queries)
    checkpoint = resolve_checkpoint(cfg)
    report = data.SkipReport()
    max_per_query = min(cfg.k, cfg.max_per_query or cfg.k)
    if not queries:
        log.warning("no query images in %s: writing a header-only submission", cfg.queries)
        submission, n_embedded = finalise(ix.empty_submission(), max_per_query), 0
    else:
        if load_model is None:
            from pair_vit.descriptor import load_descriptor

            load_model = lambda path: load_descriptor(path)[0]  # noqa: E731
        model = load_model(checkpoint).to(procs.device).eval()
        index, n_embedded = reference_index(procs, model, references, report, cfg)
        background = None
        if cfg.background:
            b_ids, b_vectors, _ = embed_split(procs, model, data.list_images(cfg.background), report, "full", cfg,
                                              "background")
            if not b_ids:
                raise ValueError(f"no usable background images in {cfg.background}")
            background = ix.ReferenceIndex.build(b_ids, b_vectors, "Flat")
            n_embedded += len(b_ids)
        q_ids, q_vectors, owner = ix.embed_folder(
            model, procs.share(queries), cfg.batch_size, cfg.amp, cfg.views, report, cfg.num_workers,
            progress=cfg.progress and procs.is_main and "queries")
        n_embedded += len(queries)
        mine = ix.search_views(index, q_ids, q_vectors, owner, cfg.k, background, cfg.background_n,
                               cfg.background_beta, progress=cfg.progress and procs.is_main and "search")
        parts = procs.gather([mine])
        submission = finalise(pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0], max_per_query)
        report.entries = [e for part in procs.gather([report.entries]) for e in part]
        report.entries = list(dict.fromkeys(report.entries))  # references/background are skipped by one process
    if procs.is_main:
        write_outputs(submission, report, cfg)
        wall = time.perf_counter() - start
        print(f"rerank (descriptor only): {len(queries)} queries, {len(references)} references, "
              f"{len(report)} unreadable skipped, {len(submission)} rows -> {cfg.output}; {wall:.1f} s wall, "
              f"{n_embedded / max(wall, 1e-9):.1f} images/s"
              + (f" ({procs.world} processes)" if procs.world > 1 else ""), file=sys.stdout, flush=True)
    return submission
