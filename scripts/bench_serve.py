"""Benchmark `pair-vit serve` over HTTP: one-query latency (median, p95), throughput with concurrent clients,
server memory, store bytes per reference.

    python scripts/bench_serve.py --n-references 10000 --out runs/bench_serve     # see --help
"""
from pair_vit import cli
from pair_vit.bench import serve

if __name__ == "__main__":
    cli.main(serve.ServeBenchConfig, serve.run)
