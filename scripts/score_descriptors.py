"""Score a descriptor-track submission (query and reference HDF5 files) as ISC2021 did: exact Euclidean k-NN,
score = -squared distance, micro-AP and recall@P90.

    python scripts/score_descriptors.py --query-descriptors OUT/query.h5 --reference-descriptors OUT/reference.h5 \
        --ground-truth GT.csv [--k 10] [--output sub.csv]
    python scripts/score_descriptors.py ... --benchmark benchmarks/dev     # its ground truth; ids checked

The first metrics line is `uAP <value> ...`. A bad file gives a one-line error naming it and exit code 2.
"""
from pair_vit import cli
from pair_vit.match import track

if __name__ == "__main__":
    cli.main(track.ScoreConfig, track.run)
