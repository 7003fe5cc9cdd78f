"""The one-command demo on the photos shipped in the package (README command 1).

Builds a small benchmark from the embedded CC0 / public-domain demo photos (cached: rebuilt only when its
config changes), runs every available matcher on it, evaluates each with the ISC2021 metric, and writes
submissions, a PR curve per matcher and a summary table under `out/`.

Matchers today: the peers (PDQ, pHash, SIFT + RANSAC) and the shipped stage-1 descriptor. The descriptor shortlist and the pair-ViT reranker
join this table as their stages land.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pair_vit import benchmark, compare, data
from pair_vit.config import load_yaml, opt, to_dict


@dataclass
class DemoConfig:
    """Run the demo: small benchmark from the shipped photos, every matcher, the ISC2021 metric."""

    out: str = opt("runs/demo", "output folder (benchmark, submissions, PR curves, results table)")
    seed: int = opt(0, "benchmark seed")
    n_references: int = opt(120, "references in the demo benchmark (the demo has 291 photos)")
    n_queries: int = opt(120, "queries in the demo benchmark (half positives, half distractors)")
    k: int = opt(10, "predictions per query")
    methods: list = opt(["pdq", "phash", "sift", "descriptor"], "matchers to run")
    workers: int = opt(2, "processes used to synthesise queries")


def benchmark_config(cfg: DemoConfig) -> benchmark.BenchmarkConfig:
    # split="all": nothing shipped was trained on the demo photos, so all of them are fair game.
    return benchmark.BenchmarkConfig(images="", out=str(Path(cfg.out) / "benchmark"), seed=cfg.seed, split="all",
                                     n_references=cfg.n_references, n_queries=cfg.n_queries,
                                     workers=cfg.workers, overwrite=True)


def ensure_benchmark(bcfg: benchmark.BenchmarkConfig) -> data.DiscLayout:
    """Reuse the benchmark at bcfg.out if it was built with the same config, else (re)build it."""
    saved = Path(bcfg.out) / "config.yaml"
    if saved.is_file() and load_yaml(saved) == to_dict(bcfg):
        print(f"reusing benchmark {bcfg.out}")
        return data.DiscLayout.from_root(bcfg.out)
    return benchmark.run(bcfg)


def compare_config(cfg: DemoConfig) -> compare.CompareConfig:
    return compare.CompareConfig(benchmark=str(Path(cfg.out) / "benchmark"), out=cfg.out, methods=list(cfg.methods),
                                 k=cfg.k, views=["full"], scaling_sizes=[0])


def run(cfg: DemoConfig) -> pd.DataFrame:
    ensure_benchmark(benchmark_config(cfg))
    table = compare.run(compare_config(cfg), command="python scripts/demo.py")
    print(f"results: {Path(cfg.out) / 'results.csv'}")
    return table
