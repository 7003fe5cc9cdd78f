"""The one-command demo on the photos shipped in the package (README command 1).

Builds a small benchmark from the embedded CC0 / public-domain demo photos (cached: rebuilt only when its
config changes), runs every available matcher on it, evaluates each with the ISC2021 metric, and writes
submissions, a PR curve per matcher and a summary table under `out/`.

Matchers: the peers (PDQ, pHash, SIFT + RANSAC), the shipped stage-1 descriptor alone (its shortlist as the
submission) and reranked by the shipped pair ViT. It ends with descriptor-only vs reranked uAP and
recall@P90, and writes `matches.png`: a picture grid of queries with their top reranked candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pair_vit.bench import make as benchmark, compare
from pair_vit import data
from pair_vit.config import load_yaml, opt, to_dict


@dataclass
class DemoConfig:
    """Run the demo: small benchmark from the shipped photos, every matcher, the ISC2021 metric."""

    out: str = opt("runs/demo", "output folder (benchmark, submissions, PR curves, results table)")
    seed: int = opt(0, "benchmark seed")
    n_references: int = opt(120, "references in the demo benchmark (the demo has 291 photos)")
    n_queries: int = opt(120, "queries in the demo benchmark (half positives, half distractors)")
    k: int = opt(10, "predictions per query")
    methods: list = opt(["pdq", "phash", "sift", "descriptor", "rerank"], "matchers to run")
    pair_views: list = opt(["full"], "pair-ViT query views (see scripts/rerank.py --pair-views)")
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
                                 k=cfg.k, views=["full"], scaling_sizes=[0], pair_views=list(cfg.pair_views),
                                 rerank_k=cfg.k)


def default_rows(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The rows of what scripts/rerank.py submits by default: descriptor-only (full view) and reranked (the
    stored calibration, "+fused", when the weights carry one)."""
    out = {}
    for label, method, variants in (("descriptor only", "descriptor", ["full"]),
                                    ("reranked", "rerank", ["full +fused", "full"])):
        rows = table[table.method == method].set_index("variant")
        found = [v for v in variants if v in rows.index]
        if found:
            out[label] = rows.loc[found[0]]
    return out


def headline(table: pd.DataFrame) -> str:
    """Descriptor-only vs reranked, the two numbers the demo is about."""
    return "\n".join(f"{label:16s} uAP {row.uAP:.3f}  recall@P90 {row['recall@P90']:.3f}  ({row.name})"
                     for label, row in default_rows(table).items())


def write_match_grid(layout: data.DiscLayout, out: Path, table: pd.DataFrame) -> Path | None:
    """matches.png: queries with their top candidates as scripts/rerank.py would submit them (if it ran)."""
    from pair_vit import viz
    from pair_vit.metrics import read_submission

    row = default_rows(table).get("reranked")
    if row is None:
        return None
    sub_path = out / f"{compare.artefact_name('rerank', row.name)}.csv"
    fig = viz.match_grid(layout.query_images(), layout.reference_images(), read_submission(sub_path),
                         layout.load_ground_truth(), title=f"queries and their top candidates (rerank {row.name})")
    viz.save_figure(fig, out / "matches.png")
    return out / "matches.png"


def run(cfg: DemoConfig) -> pd.DataFrame:
    layout = ensure_benchmark(benchmark_config(cfg))
    table = compare.run(compare_config(cfg), command="python scripts/demo.py")
    print(headline(table))
    grid = write_match_grid(layout, Path(cfg.out), table)
    print(f"results: {Path(cfg.out) / 'results.csv'}" + (f"; picture grid: {grid}" if grid else ""))
    return table
