"""scripts/train_pairs.py end to end on a dozen demo photos: outputs, resume, refusals, 2 processes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pair_vit import data
from pair_vit.pair import train as pair_train
from pair_vit.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_pairs.py"
TINY = ["--backbone-kwargs", "{depth: 2, embed_dim: 64, num_heads: 2}", "--input-size", "32", "64",
        "--group-size", "2", "--groups-per-step", "2", "--eval-groups", "2", "--heldout-fraction", "0.2",
        "--load-side", "96", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def photos(train_photos):
    """A dozen demo photos (train side of the split, see conftest.py) plus one corrupt file."""
    out = train_photos
    broken = next(f"broken{i}" for i in range(100) if data.split_of(f"broken{i}") == "train")  # not a dev id
    (out / f"{broken}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return out


def train(*args, launcher=None, tiny=TINY):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *tiny, *map(str, args)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if launcher else None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def summary_lines(result):
    return [line for line in result.stdout.splitlines() if line.startswith("train_pairs:")]


def test_train_then_resume(photos, tmp_path):
    out = tmp_path / "run"
    first = train("--train-dir", photos, "--output-dir", out, "--max-steps", 2)
    assert first.returncode == 0, first.stderr
    for name in ("checkpoint.pt", "pair_vit.pt", "config.yaml", "metrics.csv", "skipped.csv"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "checkpoint.pt", kind="pair_vit")
    assert ckpt["step"] == 2 and {"optimizer", "scheduler", "rng", "manifest"} <= set(ckpt["extra"])
    final = load_checkpoint(out / "pair_vit.pt", kind="pair_vit")
    assert all(v.dtype == torch.float16 for v in final["model_state"].values() if v.is_floating_point())
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone_kwargs"] == {
        "depth": 2, "embed_dim": 64, "num_heads": 2}
    [line] = summary_lines(first)
    assert "step 2 (from scratch)" in line and "1 images skipped" in line and "held-out AUC" in line

    again = train("--train-dir", photos, "--output-dir", out, "--max-steps", 4, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "resumed from step 2" in again.stdout
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4

    changed = train("--train-dir", photos, "--output-dir", out, "--max-steps", 6, "--resume", "--stem", "patch")
    assert changed.returncode == 2 and "stem" in changed.stderr and "cannot resume" in changed.stderr
    fresh = train("--train-dir", photos, "--output-dir", out, "--max-steps", 2)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr


def test_fine_tune_from_a_checkpoint(photos, tmp_path):
    base = train("--train-dir", photos, "--output-dir", tmp_path / "base", "--max-steps", 1)
    assert base.returncode == 0, base.stderr
    start = load_checkpoint(tmp_path / "base" / "pair_vit.pt")["model_state"]
    tuned = train("--train-dir", photos, "--output-dir", tmp_path / "ft", "--max-steps", 1, "--lr", 0,
                  "--init-from", tmp_path / "base" / "pair_vit.pt")
    assert tuned.returncode == 0, tuned.stderr
    assert "fine-tuned from" in summary_lines(tuned)[0]
    after = load_checkpoint(tmp_path / "ft" / "pair_vit.pt")["model_state"]
    learned = [k for k in start if "running_" not in k and "num_batches" not in k]  # BN statistics still move
    assert learned and all(torch.equal(start[k], after[k]) for k in learned)  # lr 0: the weights it started from
    other = train("--train-dir", photos, "--output-dir", tmp_path / "x", "--max-steps", 1, "--stem", "patch",
                  "--init-from", tmp_path / "base" / "pair_vit.pt")
    assert other.returncode == 2 and "another architecture" in other.stderr and "stem" in other.stderr


def test_cnn_stem_from_a_descriptor(photos, tmp_path):
    from pair_vit.descriptor.model import IMAGENET_MEAN, build_descriptor
    from pair_vit.checkpoint import save_checkpoint

    torch.manual_seed(3)
    desc = build_descriptor({"backbone": "resnet10t", "embed_dim": 8, "image_size": 32})
    path = save_checkpoint(tmp_path / "desc.pt", kind="descriptor", model_args=desc.model_args,
                           model_state=desc.state_dict())
    run = train("--train-dir", photos, "--output-dir", tmp_path / "run", "--max-steps", 1, "--lr", 0,
                "--stem", "cnn", "--stem-from", path)
    assert run.returncode == 0, run.stderr
    saved = load_checkpoint(tmp_path / "run" / "pair_vit.pt")
    assert saved["model_args"]["stem"] == "cnn" and saved["model_args"]["mean"] == list(IMAGENET_MEAN)
    kernel = saved["model_state"]["vit.patch_embed.proj.0.trunk.conv1.0.weight"]
    assert torch.equal(kernel, desc.backbone.state_dict()["conv1.0.weight"].half())  # lr 0: the descriptor's


def test_too_few_photos(tmp_path, photos):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copyfile(sorted(photos.glob("*.jpg"))[0], folder / "only.jpg")
    result = train("--train-dir", folder, "--output-dir", tmp_path / "out", "--max-steps", 1, "--split", "all")
    assert result.returncode == 2 and "need at least 2" in result.stderr


def test_two_processes_with_a_config_file(photos, tmp_path):
    config = tmp_path / "pairs.yaml"
    config.write_text(yaml.safe_dump({"train_dir": str(photos), "max_steps": 2, "eval_every": 1,
                                      "backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2}}))
    accelerate = Path(sys.executable).parent / "accelerate"
    launcher = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = train("--config", config, "--output-dir", tmp_path / "run", launcher=launcher, tiny=TINY[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("step 1 held-out") == 1 and result.stderr.count("held out, 1 skipped") == 1
    [line] = summary_lines(result)  # printed once, by the main process
    assert "(2 processes)" in line and "step 2" in line
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["extra"]["world_size"] == 2 and ckpt["model_args"]["backbone_kwargs"]["embed_dim"] == 64


def test_resume_is_exact(photos, tmp_path):
    """Stopping at step 2 and resuming gives the same weights as an uninterrupted run (in-process)."""
    def config(out, **overrides):
        cfg = pair_train.TrainPairsConfig(train_dir=str(photos), output_dir=str(out), max_steps=4,
                                          backbone_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
                                          input_size=[32, 64], group_size=2, groups_per_step=2, eval_groups=0,
                                          load_side=96, num_workers=0, progress=False, warmup_steps=1)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    pair_train.run(config(tmp_path / "straight"))
    pair_train.run(config(tmp_path / "split", stop_at=2))
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    pair_train.run(config(tmp_path / "split", resume=True))
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key


def test_hybrid_with_a_frozen_imagenet_trunk_trains_and_resumes(photos, tmp_path):
    """--stem hybrid: the ImageNet Lite0 trunk per image, frozen (--stem-lr-scale 0), with correspondence
    channels (--token-match mnn): the trunk's weights at the end are still ImageNet's; resuming keeps them."""
    from pair_vit.pair.model import load_pair_model, trunk_of
    from pair_vit.pretrained import imagenet_state_dict

    out, hybrid = tmp_path / "hybrid", ["--stem", "hybrid", "--stem-backbone", "tf_efficientnet_lite0",
                                        "--stem-pretrained", "imagenet", "--stem-lr-scale", "0",
                                        "--token-match", "mnn"]
    first = train("--train-dir", photos, "--output-dir", out, "--max-steps", 2, *hybrid)
    assert first.returncode == 0, first.stderr
    again = train("--train-dir", photos, "--output-dir", out, "--max-steps", 3, "--resume", *hybrid)
    assert again.returncode == 0, again.stderr
    model, meta = load_pair_model(out / "checkpoint.pt")
    assert meta["step"] == 3 and model.model_args["mean"] == [0.5, 0.5, 0.5]
    assert model.model_args["token_match"] == "mnn" and model.use_match
    imagenet = imagenet_state_dict("tf_efficientnet_lite0")
    trunk = trunk_of(model).state_dict()
    assert all(torch.equal(v, imagenet[k]) for k, v in trunk.items() if v.is_floating_point())
    unfrozen = train("--train-dir", photos, "--output-dir", tmp_path / "cnn", "--max-steps", 1, "--stem", "cnn",
                     "--stem-lr-scale", "0")
    assert unfrozen.returncode == 2 and "--stem hybrid" in unfrozen.stderr


def test_localizing_hybrid_trains_from_a_whole_query_checkpoint(photos, tmp_path):
    """--localize: every pair is also read at its localized query region (pair_vit.pair.localize); a model trained
    without it can start such a run (same weights), the checkpoint records the settings, and resuming works."""
    from pair_vit.pair.localize import LocalizeSettings
    from pair_vit.pair.model import load_pair_model

    hybrid = ["--stem", "hybrid", "--stem-backbone", "tf_efficientnet_lite0", "--stem-lr-scale", "0",
              "--token-match", "mnn"]
    whole = train("--train-dir", photos, "--output-dir", tmp_path / "whole", "--max-steps", 1, *hybrid)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "local"
    local = ["--localize", "--edit-weights", "collage=3", "--init-from", tmp_path / "whole" / "pair_vit.pt"]
    first = train("--train-dir", photos, "--output-dir", out, "--max-steps", 2, *hybrid, *local)
    assert first.returncode == 0, first.stderr
    again = train("--train-dir", photos, "--output-dir", out, "--max-steps", 3, "--resume", *hybrid, *local)
    assert again.returncode == 0, again.stderr
    model, meta = load_pair_model(out / "pair_vit.pt")
    assert meta["step"] == 3 and model.localize == LocalizeSettings()
    assert meta["config"]["edit_weights"] == ["collage=3"]
    other = train("--train-dir", photos, "--output-dir", out, "--max-steps", 4, "--resume", *hybrid)
    assert other.returncode != 0 and "localize" in other.stderr  # resuming without --localize is refused
