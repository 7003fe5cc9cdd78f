"""Where one query's time goes against a saved collection: each stage of CopyDetector.match, per settings variant.

    python scripts/bench_stages.py --collection runs/bench_serve10k/collection --queries runs/bench_serve10k/queries \
        --variants default token_recall=0 "token_recall=0 verify=none calibration=none"        # see --help
"""
from pair_vit import cli
from pair_vit.bench import stages

if __name__ == "__main__":
    cli.main(stages.StagesBenchConfig, stages.run)
