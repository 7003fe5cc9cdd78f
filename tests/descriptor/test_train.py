"""The descriptor trainer: scripts/train_descriptor.py and `pair_vit.descriptor.train.run` on a dozen demo photos
(tiny models): resuming exactly, fine-tuning, bad photos, edit weights, two processes."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pair_vit.checkpoint import load_checkpoint
from pair_vit.descriptor import train as T

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_descriptor.py"
TINY_FLAGS = ["--backbone", "test_resnet", "--embed-dim", "32", "--image-size", "64", "--batch-size", "4",
              "--views-per-photo", "2", "--cache-workers", "1", "--split", "all", "--no-progress",
              "--log-every", "1", "--warmup-steps", "1", "--threads", "1"]


def tiny_config(photos, out, **kw) -> T.TrainDescriptorConfig:
    values = dict(train_dir=str(photos), output_dir=str(out), backbone="test_resnet", embed_dim=32, image_size=64,
                  batch_size=4, views_per_photo=2, cache_workers=1, split="all", progress=False, log_every=1,
                  warmup_steps=1, max_steps=2, threads=1)
    values.update(kw)
    return T.TrainDescriptorConfig(**values)


def run_script(*args, launcher=(), env_extra=None, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *launcher, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


# ----------------------------------------------------------------------------- training runs


def test_script_trains_resumes_and_refuses_other_backbone(photos, tmp_path):
    out = tmp_path / "run"
    first = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "2", *TINY_FLAGS)
    assert first.returncode == 0, first.stderr
    for name in ("checkpoint.pt", "descriptor.pt", "config.yaml", "metrics.csv"):
        assert (out / name).is_file(), name
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    final = load_checkpoint(out / "descriptor.pt", kind="descriptor")
    assert final["model_state"]["proj.weight"].dtype == torch.float16 and final["step"] == 2
    assert "optimizer" not in final["extra"]

    again = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "2", *TINY_FLAGS)
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is never overwritten silently

    resumed = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "4", "--resume",
                         *TINY_FLAGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "steps 2 -> 4" in resumed.stdout
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert load_checkpoint(out / "descriptor.pt")["step"] == 4

    flags = [f if f != "test_resnet" else "resnet18" for f in TINY_FLAGS]
    refused = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "6", "--resume", *flags)
    assert refused.returncode == 2
    assert "backbone" in refused.stderr and "resnet18" in refused.stderr and "Traceback" not in refused.stderr

    fresh = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "1", "--overwrite",
                       *TINY_FLAGS)
    assert fresh.returncode == 0, fresh.stderr
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1"]  # the old run's rows went with it


def test_resume_continues_exactly(photos, tmp_path):
    cache = tmp_path / "cache"
    straight = tiny_config(photos, tmp_path / "a", max_steps=4, cache_dir=str(cache), mine_every=2)
    T.run(straight)
    split = replace(straight, output_dir=str(tmp_path / "b"), stop_at=2)
    T.run(split)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    assert not (tmp_path / "b" / "descriptor.pt").exists()  # stopped early: not a finished descriptor
    T.run(replace(split, stop_at=0, resume=True))
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model_state"].items():
        assert torch.allclose(value.float(), b["model_state"][key].float(), atol=1e-6), key


def test_fine_tune_with_memory_resumes_exactly(photos, tmp_path):
    cache = tmp_path / "cache"
    T.run(tiny_config(photos, tmp_path / "base", cache_dir=str(cache)))
    init = str(tmp_path / "base" / "descriptor.pt")
    straight = tiny_config(photos, tmp_path / "a", max_steps=4, cache_dir=str(cache), init_from=init, memory_size=12)
    T.run(straight)
    T.run(replace(straight, output_dir=str(tmp_path / "b"), stop_at=2))
    T.run(replace(straight, output_dir=str(tmp_path / "b"), resume=True))
    a, b = (load_checkpoint(tmp_path / x / "checkpoint.pt") for x in "ab")
    assert len(a["extra"]["memory"]["photos"]) == 12 and (a["extra"]["memory"]["photos"] >= 0).all()
    for key, value in a["model_state"].items():  # the memory is saved too, so the split run matches
        assert torch.allclose(value.float(), b["model_state"][key].float(), atol=1e-6), key
    with pytest.raises(ValueError, match="another architecture.*embed_dim"):
        T.run(tiny_config(photos, tmp_path / "c", cache_dir=str(cache), init_from=init, embed_dim=16))


def test_on_the_fly_edits_with_a_worker(photos, tmp_path):
    result = T.run(tiny_config(photos, tmp_path / "run", views_per_photo=0, num_workers=1, hard_fraction=1.0))
    assert result["step"] == 2 and np.isfinite(result["last"]["loss"])
    assert (tmp_path / "run" / "descriptor.pt").is_file()


def test_corrupt_images_are_skipped_and_counted(photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = sorted(photos.glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = T.run(tiny_config(folder, tmp_path / "run"))
    assert result["step"] == 2 and result["skipped"] >= 1
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "broken.jpg" in skipped
    assert (tmp_path / "run" / "descriptor.pt").is_file()


def test_edit_weights_train_and_a_typo_is_refused_before_the_cache(photos, tmp_path):
    result = T.run(tiny_config(photos, tmp_path / "run", edit_weights=["paste_onto=3", "blur=2"]))
    assert result["step"] == 2 and np.isfinite(result["last"]["loss"])
    with pytest.raises(ValueError, match="unknown edit family 'blurr'"):
        T.run(tiny_config(photos, tmp_path / "typo", edit_weights=["blurr=2"]))
    assert not (tmp_path / "typo" / "cache").exists()


def test_too_few_usable_images(photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted(photos.glob("*.jpg"))[0], folder / "only.jpg")
    (folder / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="at least 2 usable training images, found 1.*broken.jpg"):
        T.run(tiny_config(folder, tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="at least 2 training images, found 0"):
        T.run(tiny_config(empty, tmp_path / "run2"))


def test_two_process_accelerate_launch(photos, tmp_path):
    out = tmp_path / "ddp"
    launcher = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no")
    result = run_script("--train-dir", str(photos), "--output-dir", str(out), "--max-steps", "2", *TINY_FLAGS,
                        launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 process(es)") == 1  # printed by the main process only
    assert result.stdout.count("descriptor: steps 0 -> 2") == 1
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2 and (out / "descriptor.pt").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + 2 steps, written once


def test_frozen_early_stages_keep_their_weights_and_statistics(photos, tmp_path):
    """--freeze-stride 8: the stem and the stages up to stride 8 end the run exactly as they started."""
    from pair_vit.descriptor.model import build_descriptor

    out = tmp_path / "frozen"
    T.run(tiny_config(photos, out, freeze_stride=8, max_steps=2))
    torch.manual_seed(0)  # the trainer seeds with cfg.seed before building the model
    start = build_descriptor(load_checkpoint(out / "checkpoint.pt")["model_args"])
    trained = load_checkpoint(out / "checkpoint.pt")["model_state"]
    frozen = T.freeze_early(start.backbone, 8)
    early = {k for k, _ in start.backbone.state_dict().items()
             if any(k.startswith(name + ".") for name in ("conv1", "bn1", "layer1", "layer2"))}
    assert frozen and early
    for key in early:  # weights and batch-norm running statistics unchanged
        assert torch.equal(trained["backbone." + key], start.backbone.state_dict()[key]), key
    assert not torch.equal(trained["backbone.layer3.0.conv1.weight"], start.backbone.state_dict()["layer3.0.conv1.weight"])
