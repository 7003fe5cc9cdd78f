"""Config resolution: dataclass defaults < YAML file < command-line flags; bad values refused."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pair_vit.config import from_dict, opt, parse_config, save_config


@dataclass
class ToyConfig:
    """A toy config."""

    name: str = opt("run", "a name")
    steps: int = opt(10, "number of steps")
    lr: float = opt(1e-3, "learning rate")
    amp: bool = opt(True, "use bf16 autocast")
    model: str = opt("vit_tiny", "backbone", choices=("vit_tiny", "vit_small"))
    sizes: list = opt([112, 224], "input sizes")
    switches: list = opt([False], "a grid of on/off settings")


def test_defaults():
    cfg = parse_config(ToyConfig, [])
    assert cfg == ToyConfig()
    assert cfg.sizes == [112, 224] and cfg.sizes is not ToyConfig().sizes


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 50, "lr": 0.1, "model": "vit_small"}))
    cfg = parse_config(ToyConfig, ["--config", str(path), "--lr", "0.5"])
    assert (cfg.steps, cfg.lr, cfg.model) == (50, 0.5, "vit_small")


def test_bool_flags_are_not_type_bool():
    assert parse_config(ToyConfig, ["--no-amp"]).amp is False
    assert parse_config(ToyConfig, ["--amp"]).amp is True


def test_a_list_of_bools_reads_false_as_false(capsys):
    # bool("false") is True: a list of truth values needs its own parser
    assert parse_config(ToyConfig, ["--switches", "false", "True", "0", "yes"]).switches == [False, True, False, True]
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--switches", "maybe"])
    assert "maybe" in capsys.readouterr().err


def test_choices_enforced(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--model", "resnet"])
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet\n")
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--config", str(path)])
    assert "resnet" in capsys.readouterr().err


def test_unknown_yaml_key_refused():
    with pytest.raises(ValueError, match="stepz"):
        from_dict(ToyConfig, {"stepz": 3})


def test_save_round_trip(tmp_path):
    cfg = parse_config(ToyConfig, ["--steps", "7", "--sizes", "64", "128"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = parse_config(ToyConfig, ["--config", str(tmp_path / "run" / "config.yaml")])
    assert again == cfg and again.sizes == [64, 128]


_CONFIGS = Path(__file__).resolve().parents[1] / "pair_vit" / "configs"
_TRAINERS = {"descriptor": ("pair_vit.descriptor.train", "TrainDescriptorConfig"),
             "pairs": ("pair_vit.pair.train", "TrainPairsConfig")}


@pytest.mark.parametrize("name, module, cls", [(p.stem, *_TRAINERS[p.stem.split("_")[0]])
                                               for p in sorted(_CONFIGS.glob("*.yaml"))])
def test_shipped_configs_resolve(name, module, cls):
    """The documented training configs stay in step with their dataclasses (no unknown or mistyped keys)."""
    import importlib

    from pair_vit.config import load_yaml

    path = _CONFIGS / f"{name}.yaml"
    cfg = from_dict(getattr(importlib.import_module(module), cls), load_yaml(path))
    assert not Path(cfg.train_dir).is_absolute() and cfg.output_dir.startswith("runs/")
