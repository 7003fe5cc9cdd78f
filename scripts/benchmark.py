"""Every matcher on one benchmark: uAP, recall@P90, recall@k, wall time; faiss search scaling.

    python scripts/benchmark.py --benchmark benchmarks/dev --background ../shared/data/train
"""
from pair_vit import cli
from pair_vit.bench import compare

if __name__ == "__main__":
    cli.main(compare.CompareConfig, compare.run)
