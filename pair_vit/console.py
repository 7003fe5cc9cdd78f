"""`pair-vit`: the command installed with the package ([project.scripts]), thin over `CopyDetector`.

    pair-vit index add INDEX IMAGES...      # embed the images not yet in INDEX (created if absent), save it
    pair-vit index remove INDEX ID...       # drop references by id, save
    pair-vit index info INDEX               # counts, weights, settings, sizes on disk
    pair-vit match INDEX QUERIES... [--k 5] [--threshold T] [--output matches.csv]
    pair-vit serve INDEX [--host 127.0.0.1] [--port 8000] [--token-file FILE] [--workers N]   # docs/serve.md

IMAGES and QUERIES are files or folders (id = file stem). `index add` and `match` also take every
`DetectorConfig` option (`--shortlist`, `--no-amp`, `--checkpoint`, ... `pair-vit match --help`); a new INDEX
keeps the ones it was created with, and `match` overrides the per-match ones. `match` prints query_id,
reference_id, score (calibrated, higher = more likely a copy), is_copy, or writes them as CSV with `--output`;
unreadable queries are listed on stderr and get no rows. User errors exit with status 2 and one line.
Same as `python -m pair_vit.console ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pair_vit.cli import USER_ERRORS
from pair_vit.config import build_parser, from_dict, load_yaml
from pair_vit.io import atomic_path


def _settings_parser() -> argparse.ArgumentParser:
    from pair_vit.match.detector import DetectorConfig

    return build_parser(DetectorConfig)


def parser() -> argparse.ArgumentParser:
    """The `pair-vit` argument parser (subcommands index add|remove|info, match, serve)."""
    top = argparse.ArgumentParser(prog="pair-vit", description="Image copy detection against a saved, growing "
                                  "reference collection (pair_vit.CopyDetector).")
    commands = top.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build, extend and inspect a saved reference collection")
    actions = index.add_subparsers(dest="action", required=True)
    settings = _settings_parser()
    add = actions.add_parser("add", parents=[settings], conflict_handler="resolve",
                             help="add images (files or folders) to INDEX, created if absent; only new ones are "
                                  "embedded", description="Add references to a saved collection.")
    add.add_argument("index", help="collection folder")
    add.add_argument("images", nargs="+", help="image files or folders (id = file stem)")
    remove = actions.add_parser("remove", help="remove references by id")
    remove.add_argument("index", help="collection folder")
    remove.add_argument("ids", nargs="+", help="reference ids")
    info = actions.add_parser("info", help="what INDEX holds")
    info.add_argument("index", help="collection folder")
    match = commands.add_parser("match", parents=[settings], conflict_handler="resolve",
                                help="match query images against INDEX", description="Match queries.")
    match.add_argument("index", help="collection folder")
    match.add_argument("queries", nargs="+", help="query image files or folders (id = file stem)")
    match.add_argument("--k", type=int, default=5, help="rows per query, best first (default: 5)")
    match.add_argument("--threshold", type=float, default=None,
                       help="is_copy threshold (default: the calibration's precision-90 score)")
    match.add_argument("--output", default="", help="write the rows as CSV here instead of printing them")
    serve = commands.add_parser("serve", parents=[_serve_parser(), settings], conflict_handler="resolve",
                                help="serve INDEX over HTTP: matches, additions, removals, the review page",
                                description="An HTTP service and a review page over a saved collection "
                                            "(docs/serve.md); DetectorConfig options apply to a new INDEX as in "
                                            "`index add`, and override the per-match ones of a saved one.")
    serve.add_argument("index", help="collection folder (created by the first addition if absent)")
    return top


def _serve_parser() -> argparse.ArgumentParser:
    from pair_vit.serve.config import ServeConfig

    return build_parser(ServeConfig)


def _serve(args: argparse.Namespace) -> int:
    from pair_vit.serve import ServeConfig, serve

    names = set(ServeConfig.__dataclass_fields__)
    cfg = from_dict(ServeConfig, {k: v for k, v in vars(args).items() if k in names}, source="command line")
    cfg.check()
    serve(args.index, cfg, _options(args))
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The DetectorConfig options given on the command line (or in --config), checked."""
    from pair_vit.match.detector import DetectorConfig

    names = {f for f in DetectorConfig.__dataclass_fields__}
    given = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = {k.replace("-", "_"): v for k, v in given.items()}
    given.update({k: v for k, v in vars(args).items() if k in names})
    from_dict(DetectorConfig, given, source="command line")  # unknown options and bad choices, before any work
    return given


def _open(folder: str, options: dict[str, Any], create: bool = False):
    from pair_vit.match.detector import CopyDetector
    from pair_vit.match.store import DB_FILE

    if create and not (Path(folder) / DB_FILE).exists():
        return CopyDetector(**options)
    return CopyDetector.load(folder, **options)


def run(args: argparse.Namespace) -> int:
    if args.command == "index" and args.action == "info":
        print(json.dumps(_open(args.index, {}).info(), indent=1))
    elif args.command == "index" and args.action == "remove":
        detector = _open(args.index, {})
        detector.remove(args.ids)
        detector.save(args.index)
        print(f"removed {len(args.ids)} references: {len(detector)} left in {args.index}")
    elif args.command == "serve":
        return _serve(args)
    elif args.command == "index":
        detector = _open(args.index, _options(args), create=True)
        report = detector.add(args.images)
        detector.save(args.index)
        print(f"{report}; {len(detector)} references in {args.index}")
    else:
        return _match(args)
    return 0


def _match(args: argparse.Namespace) -> int:
    detector = _open(args.index, _options(args))
    found = detector.match(args.queries, k=args.k, threshold=args.threshold)
    for query_id, reason in found.attrs["skipped"].items():
        print(f"skipped query {query_id}: {reason}", file=sys.stderr)
    if args.output:
        with atomic_path(args.output) as tmp:
            found.to_csv(tmp, index=False, float_format="%.10g")
        print(f"{len(found)} rows -> {args.output}")
    else:
        print(found.to_string(index=False) if len(found) else "no rows")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pair-vit`: user errors exit 2 with one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
