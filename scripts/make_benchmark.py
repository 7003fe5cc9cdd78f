"""Build a DISC21-style copy-detection benchmark from a folder of photos.

    python scripts/make_benchmark.py --images ../shared/data/train --out benchmarks/dev --seed 0
"""
from pair_vit import cli
from pair_vit.bench import make

if __name__ == "__main__":
    cli.main(make.BenchmarkConfig, make.run)
