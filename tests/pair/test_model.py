"""Pair ViT: shapes, the half marker, determinism, score_pairs, stems, checkpoints round trip."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pair_vit import data, demo_dir
from pair_vit.checkpoint import CheckpointError, save_checkpoint
from pair_vit.descriptor.model import build_descriptor
from pair_vit.pair.inputs import preprocess
from pair_vit.pair.model import (build_pair_model, default_model_args, init_stem_from, load_pair_model,
                                 make_optimizer, save_pair_model, score_pairs)

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def tiny_args(**overrides):
    return default_model_args(input_size=[32, 64], backbone_kwargs=TINY, **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_pair_model(tiny_args()).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def photos():
    images = data.list_images(Path(str(demo_dir())))
    return [data.load_image(p, max_side=96) for p in list(images.values())[:4]]


def test_forward_shape_and_determinism(model, inputs):
    ref, query = inputs
    with torch.no_grad():
        a, b = model(ref, query), model(ref, query)
    assert a.shape == (6,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert model.half_size == (32, 32)


def test_half_marker_changes_output(inputs):
    torch.manual_seed(0)
    net = build_pair_model(tiny_args()).eval()
    ref, query = inputs
    with torch.no_grad():
        before = net(ref, query)
        marker = net.vit.patch_embed.proj[1].embed
        marker.copy_(marker.flip(-1) * 50)  # swap (and scale) the reference and query vectors
        after = net(ref, query)
    assert not torch.allclose(before, after, atol=1e-4)


def test_no_marker_and_both_stems_build(inputs):
    ref, query = inputs
    for stem in ("conv", "patch"):
        for marker in (True, False):
            net = build_pair_model(tiny_args(stem=stem, half_marker=marker)).eval()
            with torch.no_grad():
                assert net(ref, query).shape == (6,)
    conv, patch = build_pair_model(tiny_args(stem="conv")), build_pair_model(tiny_args(stem="patch"))
    x = torch.zeros(1, 3, 32, 64)
    assert conv.vit.patch_embed(x).shape == patch.vit.patch_embed(x).shape == (1, 8, 64)  # 2 x 4 tokens
    with pytest.raises(ValueError, match="stem"):
        build_pair_model(tiny_args(stem="resnet"))


def test_cnn_stem_keeps_the_token_grid(inputs):
    ref, query = inputs
    net = build_pair_model(tiny_args(stem="cnn")).eval()
    x = torch.zeros(1, 3, 32, 64)
    assert net.vit.patch_embed(x).shape == (1, 8, 64)  # resnet10t cut at stride 16: 2 x 4 tokens, as a 16x16 patch
    with torch.no_grad():
        assert net(ref, query).shape == (6,)
    with pytest.raises(ValueError, match="no stride-12 stage"):
        build_pair_model(default_model_args(input_size=[36, 72], backbone_kwargs={**TINY, "patch_size": 12}, stem="cnn"))


def _descriptor_checkpoint(path, backbone="resnet10t"):
    torch.manual_seed(3)
    desc = build_descriptor({"backbone": backbone, "embed_dim": 8, "image_size": 32})
    return save_checkpoint(path, kind="descriptor", model_args=desc.model_args, model_state=desc.state_dict()), desc


def test_cnn_stem_initialised_from_a_descriptor(tmp_path):
    path, desc = _descriptor_checkpoint(tmp_path / "desc.pt")
    net = build_pair_model(tiny_args(stem="cnn"))
    copied = init_stem_from(net, path)
    trunk = net.cnn_stem().trunk.state_dict()
    assert copied == len(trunk)
    for name, value in trunk.items():
        assert torch.equal(value, desc.backbone.state_dict()[name]), name


def test_cnn_stem_initialisation_refusals(tmp_path):
    path, _ = _descriptor_checkpoint(tmp_path / "desc.pt")
    with pytest.raises(ValueError, match="'conv' stem"):
        init_stem_from(build_pair_model(tiny_args()), path)
    with pytest.raises(ValueError, match="'resnet10t' descriptor cannot initialise a 'resnet18' stem"):
        init_stem_from(build_pair_model(tiny_args(stem="cnn", stem_backbone="resnet18")), path)
    pair = save_checkpoint(tmp_path / "pair.pt", kind="pair_vit", model_args={}, model_state={})
    with pytest.raises(CheckpointError, match="pair_vit"):
        init_stem_from(build_pair_model(tiny_args(stem="cnn")), pair)


def test_optimizer_groups_and_stem_learning_rate():
    net = build_pair_model(tiny_args(stem="cnn"))
    optimizer, _ = make_optimizer(net, lr=1e-3, weight_decay=0.05, warmup=0, total=10, stem_lr_scale=0.1)
    trunk = {id(p) for p in net.cnn_stem().trunk.parameters()}
    for group in optimizer.param_groups:
        in_trunk = {id(p) in trunk for p in group["params"]}
        assert len(in_trunk) == 1  # a group is all trunk or all transformer
        assert group["initial_lr"] == pytest.approx(1e-4 if in_trunk.pop() else 1e-3)
        if any(p.ndim <= 1 for p in group["params"]):  # norms and biases are never decayed
            assert group["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def test_dynamic_size_accepts_smaller_inputs():
    net = build_pair_model(tiny_args(dynamic_size=True)).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)).shape == (2,)


def test_score_pairs_probabilities_amp_close_to_fp32(model, inputs, monkeypatch):
    monkeypatch.setenv("PAIR_VIT_BF16", "1")  # the bf16 path, even on a CPU without native bf16
    ref, query = inputs
    fp32 = score_pairs(model, ref, query, batch_size=4, amp=False)
    bf16 = score_pairs(model, ref, query, batch_size=4, amp=True)
    assert fp32.dtype == np.float32 and fp32.shape == (6,)
    assert ((fp32 >= 0) & (fp32 <= 1)).all() and ((bf16 >= 0) & (bf16 <= 1)).all()
    np.testing.assert_allclose(bf16, fp32, atol=0.03)
    assert score_pairs(model, ref[:0], query[:0]).shape == (0,)
    with pytest.raises(ValueError, match="line up"):
        score_pairs(model, ref, query[:3])


def test_score_pairs_takes_pil_images_and_restores_mode(model, photos):
    model.train()
    try:
        from_pil = score_pairs(model, photos, photos[::-1], batch_size=3, amp=False)
        assert model.training
    finally:
        model.eval()
    tensors = [model.preprocess(p) for p in photos]
    np.testing.assert_array_equal(from_pil, score_pairs(model, tensors, tensors[::-1], batch_size=3, amp=False))


def test_preprocess_shape_and_range(photos):
    x = preprocess(photos[0], (48, 40))
    assert x.shape == (3, 48, 40) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5
    grey = preprocess(Image.new("L", (10, 20), 128), (8, 8))
    assert grey.shape == (3, 8, 8) and abs(float(grey.mean()) - (128 / 255 - 0.5) / 0.5) < 1e-6


def test_load_pair_model_round_trip(tmp_path, model, inputs):
    ref, query = inputs
    path = save_checkpoint(tmp_path / "full.pt", kind="pair_vit", model_args=model.model_args,
                           model_state=model.state_dict(), config={"lr": 1.0}, step=7, extra={"note": "x"})
    loaded, meta = load_pair_model(path)
    assert meta["step"] == 7 and meta["kind"] == "pair_vit" and meta["config"] == {"lr": 1.0}
    assert not loaded.training
    np.testing.assert_array_equal(score_pairs(loaded, ref, query, amp=False), score_pairs(model, ref, query, amp=False))
    # Released weights are float16: the loaded model scores like the original rounded to float16.
    save_pair_model(tmp_path / "pair_vit.pt", model, config={}, step=7)
    half, _ = load_pair_model(tmp_path / "pair_vit.pt")
    rounded = build_pair_model(model.model_args).eval()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(score_pairs(half, ref, query, amp=False),
                                  score_pairs(rounded, ref, query, amp=False))
    assert (tmp_path / "pair_vit.pt").stat().st_size < 0.6 * path.stat().st_size


def test_checkpoint_of_another_kind_is_refused(tmp_path, model):
    path = save_checkpoint(tmp_path / "desc.pt", kind="descriptor", model_args={}, model_state={})
    with pytest.raises(CheckpointError, match="descriptor"):
        load_pair_model(path)


def test_weights_that_do_not_fit_are_refused(tmp_path, model):
    args = {**model.model_args, "stem": "patch"}
    path = save_checkpoint(tmp_path / "bad.pt", kind="pair_vit", model_args=args, model_state=model.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        load_pair_model(path)


def test_unknown_model_argument_refused():
    with pytest.raises(ValueError, match="unknown pair-model argument"):
        default_model_args(depth=3)
