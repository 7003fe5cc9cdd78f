"""Score a matching submission with the ISC2021 metric.

    python scripts/evaluate.py --submission SUB.csv --ground-truth GT.csv [--edits edits.csv] [--pr-curve pr.png]

The first output line is `uAP <value> ...`. A malformed input file gives a one-line error and exit code 2.
Descriptor-track submissions (a query and a reference HDF5 file of vectors): scripts/score_descriptors.py.
"""
from pair_vit import cli, metrics

if __name__ == "__main__":
    cli.main(metrics.EvalConfig, metrics.run)
