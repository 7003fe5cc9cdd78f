"""Score a matching submission: `python scripts/evaluate.py --submission SUB.csv --ground-truth GT.csv
[--edits edits.csv] [--pr-curve pr.png] [--output metrics.json]`. First output line: `uAP <value> ...`.
A malformed input file gives a one-line error on stderr and exit code 2."""
import sys

from pair_vit.config import parse_config
from pair_vit.eval import EvalConfig, EvalInputError, run


def main() -> None:
    cfg = parse_config(EvalConfig)
    try:
        run(cfg)
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
