"""Figures of the ThreatExchange extension (pair_vit.tx) next to threatexchange's PDQ signal type, and its
descriptor-only calibration.

    python scripts/bench_tx.py --benchmark benchmarks/dev --write-calibration      # see --help
"""
from pair_vit import cli
from pair_vit.bench import tx

if __name__ == "__main__":
    cli.main(tx.TxBenchConfig, tx.run)
