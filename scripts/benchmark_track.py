"""The descriptor track on one benchmark: PDQ, pHash and the descriptor with each normalisation inside the vectors.

    python scripts/benchmark_track.py --benchmark benchmarks/dev --train ../shared/data/train --cache runs/track_cache
"""
from pair_vit import cli
from pair_vit.bench import track

if __name__ == "__main__":
    cli.main(track.TrackBenchConfig, track.run)
