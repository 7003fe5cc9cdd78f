"""Benchmark the library API on a saved collection: build, load, one-query match (fp32 and bf16), adding references,
bytes per reference, IVF-PQ vs Flat recall.

    python scripts/bench_index.py --out runs/bench_index          # 10,000 references + 1,000 added (see --help)
"""
from pair_vit import cli
from pair_vit.bench import library

if __name__ == "__main__":
    cli.main(library.IndexBenchConfig, library.run)
