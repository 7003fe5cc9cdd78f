"""Where one query's time goes: each stage of `CopyDetector.match` on a saved collection, per settings variant.

    python scripts/bench_stages.py --collection runs/bench_serve10k/collection --queries runs/bench_serve10k/queries \
        --variants default token_recall=0 "token_recall=0 verify=none calibration=none" --out runs/bench_stages

A variant is "default" or space-separated `setting=value` overrides of the collection's per-match settings
(`DetectorConfig`). For each: the collection is loaded with them, one warm-up query is matched and timed on its own
(`first_s`: first forward passes, and with token recall the token index built from the store), then every query one
at a time; the table gives the median wall seconds of each stage (`result.attrs["seconds"]`: descriptor
shortlist, token recall, pair ViT, SIFT verification), of the whole `match` call, and the process's peak memory.
Written to OUT/results.{json,md} with the CPU and its load average.
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pair_vit import data
from pair_vit.bench.library import machine
from pair_vit.config import opt, save_config
from pair_vit.io import write_text_atomic

STAGES = ("shortlist", "token_recall", "pair", "verify")


@dataclass
class StagesBenchConfig:
    """Time each stage of one query against a saved collection, for several settings variants."""

    collection: str = opt("", "saved collection folder (pair-vit index add, CopyDetector.save)")
    queries: str = opt("", "folder of query images, matched one at a time")
    n_queries: int = opt(20, "at most this many queries per variant")
    variants: list = opt(["default"], "settings variants: default, or space-separated setting=value overrides")
    out: str = opt("runs/bench_stages", "folder for results.json and results.md")


def parse_variant(text: str) -> dict[str, Any]:
    """"token_recall=0 verify=none token_geometry=false" -> {"token_recall": 0, "verify": "none", "token_geometry":
    False}; "default" -> {}."""
    options: dict[str, Any] = {}
    for part in text.split():
        if part == "default":
            continue
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"bad variant {text!r}: expected default or setting=value ...")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"  # the string "false" would read as True
        else:
            options[name] = int(value) if value.lstrip("-").isdigit() else value
    return options


def time_variant(folder: str, queries: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per stage and per query of one settings variant (see the module docstring)."""
    from pair_vit.match.detector import CopyDetector

    detector = CopyDetector.load(folder, progress=False, **options)
    start = time.perf_counter()
    detector.match(queries[0])
    first = time.perf_counter() - start
    totals, stages = [], {name: [] for name in STAGES}
    for path in queries:
        start = time.perf_counter()
        found = detector.match(path)
        totals.append(time.perf_counter() - start)
        for name in STAGES:
            stages[name].append(found.attrs["seconds"][name])
    return {"options": options, "first_s": first, "median_s": statistics.median(totals),
            **{f"{name}_s": statistics.median(values) for name, values in stages.items()},
            "references": len(detector), "n": len(queries)}


def run(cfg: StagesBenchConfig) -> list[dict[str, Any]]:
    if not cfg.collection or not cfg.queries:
        raise ValueError("--collection and --queries are required")
    queries = sorted(data.list_images(cfg.queries).values())[:cfg.n_queries]
    if not queries:
        raise ValueError(f"no query images in {cfg.queries}")
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    start_machine = machine()
    rows = [{"variant": v, **time_variant(cfg.collection, queries, parse_variant(v))} for v in cfg.variants]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = {"machine": start_machine, "peak_rss_bytes": peak, "rows": rows}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    write_text_atomic(out / "results.md", report(results))
    print(report(results))
    return rows


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"{results['rows'][0]['references']} references; {m['cpu']} ({m['cores']} cores, native bf16: "
             f"{m['native_bf16']}), load average at the start {m['load_average']}; peak memory of the process "
             f"{results['peak_rss_bytes'] / 2 ** 20:.0f} MiB", "",
             "| variant | one query, median | shortlist | token recall | pair ViT | SIFT | first query |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} s | {r['shortlist_s']:.3f} | {r['token_recall_s']:.3f} | "
                     f"{r['pair_s']:.3f} | {r['verify_s']:.3f} | {r['first_s']:.1f} s |")
    return "\n".join(lines) + "\n"
