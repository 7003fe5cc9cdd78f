"""Shortlist recall of token-recall settings on a labelled benchmark, overall and per edit family.

    python scripts/sweep_token_recall.py --benchmark benchmarks/tune --scales 1,2 1,2,3 --floors 0.4 0.5 \
        --candidates 0 3 5 --out runs/sweep_tune                                              # see --help
"""
from pair_vit import cli
from pair_vit.bench import token_sweep

if __name__ == "__main__":
    cli.main(token_sweep.TokenSweepConfig, token_sweep.run)
