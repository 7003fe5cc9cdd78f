"""The one-command demo on the photos shipped in the package: benchmark, matchers, ISC2021 metric.

    python scripts/demo.py [--out runs/demo]
"""
from pair_vit import cli
from pair_vit.bench import demo

if __name__ == "__main__":
    cli.main(demo.DemoConfig, demo.run)
