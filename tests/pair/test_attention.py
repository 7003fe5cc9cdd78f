"""Attention rollout: shapes and range, hooks leave the model as it was, hand-checked rollouts, overlay."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pair_vit import data, demo_dir
from pair_vit.pair.attention import attention_rollout, capture_attention, overlay, pair_image, pair_rollout
from pair_vit.pair.model import build_pair_model, default_model_args, score_pairs


def small_model(**backbone_kwargs):
    torch.manual_seed(0)
    return build_pair_model(default_model_args(backbone_kwargs={"depth": 2, **backbone_kwargs})).eval()


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def pair():
    images = data.list_images(Path(str(demo_dir())))
    return [data.load_image(p, max_side=256) for p in list(images.values())[:2]]


def test_shapes_range_and_probability(model, pair):
    result = pair_rollout(model, *pair)
    assert result.grid.shape == (7, 14) and result.grid.dtype == np.float32
    assert result.reference.shape == result.query.shape == (7, 7)
    np.testing.assert_array_equal(np.hstack([result.reference, result.query]), result.grid)
    assert result.grid.min() >= 0 and result.grid.max() == pytest.approx(1.0)
    expected = score_pairs(model, [pair[0]], [pair[1]], amp=False)[0]
    assert result.probability == pytest.approx(float(expected), abs=1e-5)


def test_model_unchanged_afterwards(pair):
    model = small_model().train()
    ref, query = (model.preprocess(im)[None] for im in pair)
    fused = [b.attn.fused_attn for b in model.vit.blocks]
    model.eval()
    with torch.no_grad():
        before = model(ref, query)
    model.train()
    pair_rollout(model, *pair)
    assert model.training  # mode restored
    assert all(not b.attn._forward_hooks and not b.attn._forward_pre_hooks for b in model.vit.blocks)
    assert [b.attn.fused_attn for b in model.vit.blocks] == fused
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ref, query), before)


def test_captured_attention_matches_timm_explicit_path(model, pair):
    """The recomputed weights are those timm's non-fused path multiplies v by (its attn_drop input)."""
    ref, query = (model.preprocess(im)[None] for im in pair)
    explicit, handles = [], []
    for block in model.vit.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: explicit.append(o.detach())))
    try:
        with torch.no_grad(), capture_attention(model.vit) as captured:
            model(ref, query)
    finally:
        for block, handle in zip(model.vit.blocks, handles):
            block.attn.fused_attn = True
            handle.remove()
    assert len(captured) == len(explicit) == 2
    for ours, theirs in zip(captured, explicit):
        assert ours.shape == (1, 3, 99, 99)  # (batch, heads of vit_tiny, cls + 7 * 14 tokens, same)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_rollout_hand_checked():
    eye = torch.eye(3)[None, None]
    # identity attention: nothing mixes, so the class token receives nothing and each patch only itself
    assert torch.equal(attention_rollout([eye, eye], 1, "token"), torch.zeros(1, 2))
    assert torch.allclose(attention_rollout([eye, eye], 1, "avg"), torch.full((1, 2), 0.5))
    # uniform attention J/N with the residual: R = 0.5^L (I - J/N) + J/N, so each patch gets (1 - 0.5^L) / N
    uniform = torch.full((1, 2, 3, 3), 1 / 3)
    assert torch.allclose(attention_rollout([uniform, uniform], 1, "token"), torch.full((1, 2), 0.25))
    # layer 1: cls looks at itself, patch 1 at patch 2; layer 2: cls looks at patch 1. Order matters:
    # R[0] = 0.5 [1, 0, 0] + 0.5 [0, 0.5, 0.5] -> flow 0.25 to each patch (0.5 / 0 if composed backwards)
    first = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]])[None]
    second = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])[None]
    assert torch.allclose(attention_rollout([first, second], 1, "token"), torch.tensor([[0.25, 0.25]]))
    assert torch.allclose(attention_rollout([second], 1, "token"), torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(attention_rollout([second], 1, "token", residual=False), torch.tensor([[1.0, 0.0]]))


def test_average_pooled_model_without_class_token(pair):
    model = small_model(class_token=False, global_pool="avg")
    assert model.vit.num_prefix_tokens == 0
    result = pair_rollout(model, *pair)
    assert result.grid.shape == (7, 14) and 0 <= result.grid.min() and result.grid.max() == pytest.approx(1.0)


def test_overlay(model, pair):
    image = pair_image(model, *pair, height=56)
    assert image.size == (112, 56)
    heat = np.zeros((7, 14), np.float32)
    heat[:, 7:] = 1.0
    rgb = overlay(image, heat, alpha=1.0, smooth=False)
    assert rgb.shape == (56, 112, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :56] == rgb[0, 0]).all() and (rgb[:, 56:] == rgb[0, -1]).all()
    assert not (rgb[0, 0] == rgb[0, -1]).all()
    np.testing.assert_array_equal(overlay(np.asarray(image), heat, alpha=0.0), np.asarray(image))
