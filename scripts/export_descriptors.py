"""Write the descriptors of a query folder and a reference folder as ISC2021 descriptor-track files.

    python scripts/export_descriptors.py --queries Q/ --references R/ --out runs/track      # OUT/query.h5, reference.h5
    python scripts/export_descriptors.py --benchmark benchmarks/dev --out runs/track --normalise subtract \
        --train ../shared/data/train                                  # negative embedding subtraction
    python scripts/export_descriptors.py ... --method pdq                # PDQ bits as 0/1 floats (Hamming distance)

Score them with scripts/score_descriptors.py. Unreadable images are listed in OUT/skipped.csv and get no vector.
"""
from pair_vit import cli
from pair_vit.descriptor import track

if __name__ == "__main__":
    cli.main(track.ExportConfig, track.run)
