"""Fit the pair-ViT score calibration (logit + descriptor fusion) on a labelled benchmark.

    python scripts/calibrate.py --benchmark benchmarks/dev [--write-checkpoint]

Prints uAP before/after (2-fold cross-fit over queries) and the score threshold with precision 90.
"""
from pair_vit import cli
from pair_vit.match import calibrate

if __name__ == "__main__":
    cli.main(calibrate.CalibrateConfig, calibrate.run)
