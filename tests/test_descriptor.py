"""The stage-1 descriptor: model, embedding, checkpoints, and its trainer (tiny models, a dozen demo photos)."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pair_vit import demo_dir
from pair_vit import descriptor as D
from pair_vit import descriptor_train as T
from pair_vit.checkpoint import load_checkpoint, save_checkpoint, state_dict_to

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_descriptor.py"
DEMO = Path(str(demo_dir())) / "clothing_cc0"
TINY = {"backbone": "test_resnet", "embed_dim": 32, "image_size": 64, "gem_p": 3.0}
TINY_FLAGS = ["--backbone", "test_resnet", "--embed-dim", "32", "--image-size", "64", "--batch-size", "4",
              "--views-per-photo", "2", "--cache-workers", "1", "--split", "all", "--no-progress",
              "--log-every", "1", "--warmup-steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(DEMO.glob("*.jpg"))[:12]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def images(photos):
    return [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.jpg"))[:6]]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # In-process training runs use 1 thread (tiny batches; robust on a busy CPU); restore the default after.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return D.build_descriptor(TINY).eval()


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


# ----------------------------------------------------------------------------- model


def test_forward_shape_unit_norm_and_features():
    model = tiny_model()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z = model(x)
        feats = model.forward_features(x)
    assert z.shape == (3, 32) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert feats.ndim == 4 and feats.shape[0] == 3
    assert model.model_args == TINY and model.image_size == 64


def test_default_model_fits_the_release_budget():
    cfg = D.DescriptorModelConfig()
    assert cfg.embed_dim <= 256
    model = D.build_descriptor({"backbone": cfg.backbone, "embed_dim": cfg.embed_dim, "image_size": cfg.image_size})
    n_bytes = sum(v.numel() * 2 for v in state_dict_to(model.state_dict(), torch.float16).values()
                  if v.is_floating_point())
    assert n_bytes <= 15e6, f"fp16 weights of the default descriptor take {n_bytes / 1e6:.1f} MB"
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, cfg.image_size, cfg.image_size)).shape == (2, cfg.embed_dim)


def test_unused_head_modules_are_dropped():
    model = D.build_descriptor({"backbone": "mobilenetv3_small_050", "embed_dim": 16, "image_size": 64})
    assert not any(k.startswith("backbone.conv_head") for k in model.state_dict())
    z = model(torch.randn(2, 3, 64, 64))
    z.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used


def test_pretrained_backbone_from_a_local_file(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = D.build_descriptor(TINY, pretrained=str(tmp_path / "backbone.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_bad_model_args_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        D.build_descriptor({**TINY, "embed_dim": 512})
    with pytest.raises(ValueError, match="unknown.*colour"):
        D.build_descriptor({**TINY, "colour": 1})


def test_gem_with_p1_is_average_pooling():
    x = torch.rand(2, 5, 4, 4)
    gem = D.GeM(p=1.0)
    assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.all(D.GeM(p=3.0)(x) >= gem(x) - 1e-6)


def test_preprocess(images):
    x = D.preprocess(images[0], 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    white = D.preprocess(Image.new("RGB", (30, 20), (255, 255, 255)), 16)
    expected = (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    assert torch.allclose(white[:, 0, 0], expected, atol=1e-5)


def test_embed_amp_matches_fp32_and_tensor_input(images, monkeypatch):
    monkeypatch.setenv("PAIR_VIT_BF16", "1")  # the bf16 path, even on a CPU without native bf16
    model = tiny_model()
    fp32 = D.embed(model, images, batch_size=4, amp=False)
    bf16 = D.embed(model, images, batch_size=4, amp=True)
    assert fp32.shape == (6, 32) and fp32.dtype == np.float32 and bf16.dtype == np.float32
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(fp32 * bf16, axis=1)) > 0.98
    batch = torch.stack([D.preprocess(im, 64) for im in images])
    assert np.allclose(D.embed(model, batch, batch_size=5, amp=False), fp32, atol=1e-5)
    assert D.embed(model, [], amp=False).shape == (0, 32)


def test_load_descriptor_round_trip(tmp_path, images):
    model = tiny_model(seed=3)
    path = tmp_path / "descriptor.pt"
    save_checkpoint(path, kind="descriptor", model_args=model.model_args,
                    model_state=state_dict_to(model.state_dict(), torch.float16), config={}, step=5)
    loaded, meta = D.load_descriptor(path)
    assert not loaded.training and meta["step"] == 5 and meta["model_args"] == TINY
    assert "model_state" not in meta
    assert next(loaded.parameters()).dtype == torch.float32
    a, b = D.embed(model, images, amp=False), D.embed(loaded, images, amp=False)
    assert np.min(np.sum(a * b, axis=1)) > 0.999  # fp16 storage costs next to nothing
    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="pair_vit", model_args={}, model_state={}, config={}, step=0)
    with pytest.raises(ValueError, match="other.pt"):
        D.load_descriptor(other)


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


def test_resume_continues_exactly(photos, tmp_path):
    cache = tmp_path / "cache"
    straight = tiny_config(photos, tmp_path / "a", max_steps=4, cache_dir=str(cache), mine_every=2)
    T.train(straight)
    split = replace(straight, output_dir=str(tmp_path / "b"), stop_at=2)
    T.train(split)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    assert not (tmp_path / "b" / "descriptor.pt").exists()  # stopped early: not a finished descriptor
    T.train(replace(split, stop_at=0, resume=True))
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model_state"].items():
        assert torch.allclose(value.float(), b["model_state"][key].float(), atol=1e-6), key


def test_fine_tune_with_memory_resumes_exactly(photos, tmp_path):
    cache = tmp_path / "cache"
    T.train(tiny_config(photos, tmp_path / "base", cache_dir=str(cache)))
    init = str(tmp_path / "base" / "descriptor.pt")
    straight = tiny_config(photos, tmp_path / "a", max_steps=4, cache_dir=str(cache), init_from=init, memory_size=12)
    T.train(straight)
    T.train(replace(straight, output_dir=str(tmp_path / "b"), stop_at=2))
    T.train(replace(straight, output_dir=str(tmp_path / "b"), resume=True))
    a, b = (load_checkpoint(tmp_path / x / "checkpoint.pt") for x in "ab")
    assert len(a["extra"]["memory"]["photos"]) == 12 and (a["extra"]["memory"]["photos"] >= 0).all()
    for key, value in a["model_state"].items():  # the memory is saved too, so the split run matches
        assert torch.allclose(value.float(), b["model_state"][key].float(), atol=1e-6), key
    with pytest.raises(ValueError, match="another architecture.*embed_dim"):
        T.train(tiny_config(photos, tmp_path / "c", cache_dir=str(cache), init_from=init, embed_dim=16))


def test_on_the_fly_edits_with_a_worker(photos, tmp_path):
    result = T.train(tiny_config(photos, tmp_path / "run", views_per_photo=0, num_workers=1, hard_fraction=1.0))
    assert result["step"] == 2 and np.isfinite(result["last"]["loss"])
    assert (tmp_path / "run" / "descriptor.pt").is_file()


def test_corrupt_images_are_skipped_and_counted(photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = sorted(photos.glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = T.train(tiny_config(folder, tmp_path / "run"))
    assert result["step"] == 2 and result["skipped"] >= 1
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "broken.jpg" in skipped
    assert (tmp_path / "run" / "descriptor.pt").is_file()


def test_edit_weights_train_and_a_typo_is_refused_before_the_cache(photos, tmp_path):
    result = T.train(tiny_config(photos, tmp_path / "run", edit_weights=["paste_onto=3", "blur=2"]))
    assert result["step"] == 2 and np.isfinite(result["last"]["loss"])
    with pytest.raises(ValueError, match="unknown edit family 'blurr'"):
        T.train(tiny_config(photos, tmp_path / "typo", edit_weights=["blurr=2"]))
    assert not (tmp_path / "typo" / "cache").exists()


def test_too_few_usable_images(photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted(photos.glob("*.jpg"))[0], folder / "only.jpg")
    (folder / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="at least 2 usable training images, found 1.*broken.jpg"):
        T.train(tiny_config(folder, tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="at least 2 training images, found 0"):
        T.train(tiny_config(empty, tmp_path / "run2"))


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
