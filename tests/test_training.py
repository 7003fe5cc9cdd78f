"""Pieces both trainers share: --resume/--overwrite checks, RNG states in checkpoints, metrics CSV, threads."""
import csv
import random
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pair_vit import training
from pair_vit.checkpoint import load_checkpoint, save_checkpoint


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_survive_a_checkpoint(tmp_path):
    states = training.rng_states()
    expected = draws()
    save_checkpoint(tmp_path / "c.pt", kind="test", model_args={}, model_state={}, extra={"rng": states})
    draws()
    training.set_rng_states(load_checkpoint(tmp_path / "c.pt")["extra"]["rng"])  # weights_only: lists, not tuples
    assert draws() == expected


def test_only_the_kinds_asked_for():
    states = training.rng_states(("torch",))
    assert list(states) == ["torch"]
    expected_torch = torch.rand(2)
    numpy_next = np.random.get_state()[2]
    training.set_rng_states(states)
    assert torch.equal(torch.rand(2), expected_torch) and np.random.get_state()[2] == numpy_next


def test_checkpoint_to_resume(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert training.checkpoint_to_resume(path, resume=False, overwrite=False, kind="test") is None
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        training.checkpoint_to_resume(path, resume=True, overwrite=False, kind="test")
    save_checkpoint(path, kind="test", model_args={}, model_state={}, step=3)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        training.checkpoint_to_resume(path, resume=False, overwrite=False, kind="test")
    assert training.checkpoint_to_resume(path, resume=False, overwrite=True, kind="test") is None
    assert training.checkpoint_to_resume(path, resume=True, overwrite=False, kind="test")["step"] == 3
    with pytest.raises(ValueError, match="other"):
        training.checkpoint_to_resume(path, resume=True, overwrite=False, kind="other")


def test_refuse_resume_names_every_difference(tmp_path):
    @dataclass
    class Config:
        backbone: str = "a"
        size: tuple = (1, 2)
        lr: float = 0.1

    ckpt = {"config": {"backbone": "b", "size": [1, 2], "lr": 0.5}}
    diffs = training.config_diffs(ckpt, Config(), ["backbone", "size"])
    assert diffs == ["backbone: saved 'b', now 'a'"]  # lists and tuples compare by items; lr is not checked
    training.refuse_resume(tmp_path / "c.pt", [])
    with pytest.raises(ValueError, match=r"cannot resume from .*c\.pt.*backbone.*; photos"):
        training.refuse_resume(tmp_path / "c.pt", diffs + ["photos"])


def test_append_metrics(tmp_path):
    path = tmp_path / "metrics.csv"
    training.append_metrics(path, {"step": 1, "loss": 0.5})
    training.append_metrics(path, {"step": 2, "loss": 0.25})
    assert list(csv.reader(path.open())) == [["step", "loss"], ["1", "0.5"], ["2", "0.25"]]
    fixed = tmp_path / "fixed.csv"
    training.append_metrics(fixed, {"step": 1, "loss": 0.5}, columns=("step", "loss", "auc"))
    training.append_metrics(fixed, {"step": 1, "auc": 0.9}, columns=("step", "loss", "auc"))
    assert fixed.read_text().splitlines() == ["step,loss,auc", "1,0.5,", "1,,0.9"]


def test_set_torch_threads():
    before = torch.get_num_threads()
    try:
        training.set_torch_threads(1)
        assert torch.get_num_threads() == 1
        training.set_torch_threads(0)  # torch's default is left alone
        assert torch.get_num_threads() == 1
        training.set_torch_threads(0, processes=10_000)  # the cores split between processes, at least 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_accelerator_and_broadcast_in_one_process():
    acc = training.start_accelerator()
    assert acc.is_main_process and acc.num_processes == 1
    assert training.broadcast(acc, {"a": 1}) == {"a": 1}
    assert training.broadcast(SimpleNamespace(num_processes=1), None) is None


def test_warmup_cosine_schedule():
    assert training.warmup_cosine(0, 10, 100) < training.warmup_cosine(9, 10, 100) < 1.0
    assert training.warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert training.warmup_cosine(55, 10, 100) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert training.warmup_cosine(100, 10, 100) == pytest.approx(0.01)
    assert training.warmup_cosine(500, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_init_from_fills_arguments_an_older_checkpoint_lacks(tmp_path):
    model = torch.nn.Linear(2, 1)
    path = save_checkpoint(tmp_path / "old.pt", kind="test", model_args={"width": 2},
                           model_state=model.state_dict())
    now = {"width": 2, "stem": "conv"}  # "stem" did not exist when old.pt was written
    with pytest.raises(ValueError, match="stem: saved None"):
        training.init_from(torch.nn.Linear(2, 1), path, "test", now)
    other = torch.nn.Linear(2, 1)
    training.init_from(other, path, "test", now, defaults={"stem": "conv"})
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(ValueError, match="stem: saved 'patch', now 'conv'"):
        training.init_from(other, path, "test", now, defaults={"stem": "patch"})


def test_nearest_neighbours_excludes_self_and_sorts():
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = training.nearest_neighbours(x, 5)
    assert table.shape == (30, 5) and table.dtype == np.int64 and not (table == np.arange(30)[:, None]).any()
    assert (np.diff(np.take_along_axis(x @ x.T, table, axis=1), axis=1) <= 1e-6).all()  # best first
    assert training.nearest_neighbours(x[:3], 10).shape == (3, 2)  # k capped at the other rows
    assert training.nearest_neighbours(x[:1], 5).shape == (1, 0)
