"""Run configuration: dataclasses with documented defaults, overridable from YAML and the command line.

Every stage has a config dataclass whose fields are declared with `opt(default, "help")`. Scripts call
`parse_config(MyConfig)`, which builds an argparse parser from the fields (one `--kebab-case` flag each),
applies `--config FILE.yaml` first and explicit flags last, and returns the resolved dataclass.
`save_config` writes the resolved values next to a run so every output says how it was made.

Precedence (lowest to highest): dataclass default < YAML file < command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from pair_vit.io import write_text_atomic

T = TypeVar("T")


def opt(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """Declare a config field: its default, a one-line help text, and optional allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """Field `name` of config class `cls` again (same help and choices), with its default or `default`: a stage
    that shares an option with another states it once."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return opt(default, f.metadata.get("help", ""), f.metadata.get("choices"))


def options_of(cls: type, names: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """`dataclasses.make_dataclass` entries (name, type, field) repeating the options `names` of `cls`."""
    hints = typing.get_type_hints(cls)
    return [(name, hints[name], option_like(cls, name)) for name in names]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, tuple | None]:
    """Map a field annotation to (python type for argparse, Literal choices or None)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = typing.get_args(tp)
        return type(values[0]), values
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp, None


def truth(text) -> bool:
    """A truth value from the command line or YAML ("true", "False", "1", "no", ...; a bool as it is); a list of
    bools cannot use `type=bool`, for which every non-empty string is True."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a truth value: {text!r} (true or false)")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    base, literal_choices = _base_type(tp)
    choices = f.metadata.get("choices") or literal_choices
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    # SUPPRESS keeps unset flags out of the namespace, so a YAML value is not masked by a default.
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")}
    if base is bool:
        # Never `type=bool` (bool("False") is True): --flag / --no-flag instead.
        kwargs["action"] = argparse.BooleanOptionalAction
    elif base in (list, tuple) or typing.get_origin(base) in (list, tuple):
        item_types = typing.get_args(base) or ([type(default[0])] if default else [str])
        kwargs["nargs"] = "+"
        kwargs["type"] = truth if item_types[0] is bool else item_types[0]
    else:
        kwargs["type"] = base if base in (int, float, str) else str
        if choices:
            kwargs["choices"] = choices
    parser.add_argument(_flag(f.name), **kwargs)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with `--config` plus one flag per dataclass field."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of field values; explicit flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _add_field(parser, f, hints[f.name])
    return parser


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a mapping, refusing unknown keys (a typo must not be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    cfg = cls(**values)
    validate_choices(cfg)
    return cfg


def validate_choices(cfg: Any) -> None:
    """Raise if a field declared with choices (or a Literal type) holds another value."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices") or _base_type(hints[f.name])[1]
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"{type(cfg).__name__}.{f.name}={value!r} is not one of {list(choices)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Resolve `cls` from dataclass defaults, then `--config FILE.yaml`, then command-line flags."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    values = load_yaml(config_file) if config_file else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(args)
    try:
        return from_dict(cls, values, source=str(config_file or "command line"))
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe dict of a config (Paths become strings)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run's outputs say how they were made."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
