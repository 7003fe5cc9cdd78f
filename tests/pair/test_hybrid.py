"""The hybrid pair ViT: per-image trunk tokens, the transformer over both grids, frozen trunks, token caching."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pair_vit import data, demo_dir
from pair_vit.pair import scoring
from pair_vit.pair.attention import pair_rollout
from pair_vit.pair.model import build_pair_model, default_model_args, stem_input_stats

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def hybrid(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {"input_size": [32, 64], "stem": "hybrid", "stem_backbone": "test_efficientnet",
                "backbone_kwargs": TINY, **stem_input_stats("hybrid", "test_efficientnet"), **overrides}
    args = default_model_args(**settings)
    return build_pair_model(args).eval()


def test_tokens_are_per_image_and_the_transformer_reads_both_grids():
    model = hybrid()
    ref, query = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    t_ref, t_query = model.tokens(ref), model.tokens(query)
    assert t_ref.shape == (3, 48, 2, 2) and model.token_grid == (2, 4)
    with torch.no_grad():
        logits = model(ref, query)
        assert torch.allclose(logits, model.forward_tokens(t_ref, t_query), atol=1e-5)
        # a reference's tokens do not depend on the query it is paired with (no receptive field crosses the seam)
        assert torch.allclose(model.tokens(ref[:1]), t_ref[:1], atol=1e-6)
        # swapping the sides changes the answer: the half marker and positions tell them apart
        assert not torch.allclose(model(query, ref), logits, atol=1e-4)


def test_indexed_pairs_equal_explicit_pairs():
    model = hybrid()
    ref, query = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    ri, qi = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.allclose(model(ref, query, ri, qi), model(ref[ri], query[qi]), atol=1e-5)


def test_frozen_trunk_gets_no_gradients_and_keeps_its_statistics():
    model = hybrid()
    model.freeze_trunk()
    model.train()
    assert not model.trunk.training and model.vit.training
    stats = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.head.weight.grad is not None
    assert all(torch.equal(stats[k], v) for k, v in model.trunk.state_dict().items())


def test_a_hybrid_transformer_has_no_hub_weights():
    with pytest.raises(ValueError, match="no pretrained weights offline"):
        build_pair_model(default_model_args(input_size=[32, 64], stem="hybrid", stem_backbone="test_efficientnet",
                                            backbone_kwargs=TINY), pretrained="timm/vit_tiny")


def test_halves_must_be_whole_tokens():
    with pytest.raises(ValueError, match="multiples of 16"):
        hybrid(input_size=[40, 80])


@pytest.mark.parametrize("token_match", ["none", "mnn"])
def test_token_cache_scores_as_the_model_and_stays_bounded(tmp_path, token_match):
    model = hybrid(token_match=token_match)
    photos = sorted((Path(str(demo_dir())) / "clothing_cc0").glob("*.jpg"))[:4]
    paths = {p.stem: p for p in photos}
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths["broken"] = tmp_path / "broken.jpg"
    report = data.SkipReport()
    images = scoring.TensorCache(paths, model.half_size, report, capacity=0)
    cache = scoring.TokenCache(model, images, capacity=2, amp=False)
    tokens = cache.get_many(list(paths))
    assert tokens["broken"] is None and len(report) == 1
    assert len(cache._cache) == 2  # bounded: the least recently used were dropped
    ids = [p.stem for p in photos]
    rows = pd.DataFrame({"query_id": ids[:2] * 2, "reference_id": ids[2:] + ids[2:][::-1], "score": 0.5})
    scored, n = scoring.score_shortlist(model, rows, paths, paths, ["full"], data.SkipReport(), amp=False)
    pixels = {i: scoring.to_uint8(data.load_image(paths[i], max_side=256), model.half_size) for i in ids}
    direct = scoring.pair_logits(model, torch.stack([pixels[r] for r in scored.reference_id]),
                                 torch.stack([pixels[q] for q in scored.query_id]), amp=False)
    assert n == 4 and np.allclose(scored.logit.to_numpy(), direct, atol=1e-4)


@pytest.mark.parametrize("token_match", ["none", "mnn"])
def test_attention_rollout_covers_the_token_grid(token_match):
    model = hybrid(token_match=token_match)
    a, b = (Image.open(p).convert("RGB") for p in sorted((Path(str(demo_dir())) / "clothing_cc0").glob("*.jpg"))[:2])
    result = pair_rollout(model, a, b)
    assert result.grid.shape == model.token_grid and 0 <= result.probability <= 1


def test_pairs_per_second_on_cached_tokens():
    assert scoring.timed_pairs_per_second(hybrid(), n=32, batch_size=8, amp=False) > 0


def test_match_channels_on_hand_made_grids():
    from pair_vit.pair.hybrid import MATCH_CHANNELS, match_channels

    # reference tokens e_0, e_1, e_2 on a 1 x 3 grid; the query holds e_2, e_1 and a blend e_0 + 2 e_1
    basis = torch.eye(3)
    ref = basis.T.reshape(1, 3, 1, 3)  # token j = e_j
    query = torch.stack([basis[2], basis[1], basis[0] + 2 * basis[1]], dim=1).reshape(1, 3, 1, 3)
    r, q = match_channels(ref, query)
    assert r.shape == q.shape == (1, MATCH_CHANNELS, 1, 3)
    best, margin, mutual, x, y = r[0, :, 0]
    a, b = 5 ** -0.5, 2 * 5 ** -0.5  # cosines of the blend with e_0 and e_1
    assert torch.allclose(best, torch.tensor([a, 1.0, 1.0]))  # e_0's nearest query token is the blend
    assert torch.allclose(margin, torch.tensor([a, 1 - b, 1.0]))
    assert mutual.tolist() == [0.0, 1.0, 1.0]  # the blend's own nearest reference token is e_1, not e_0
    assert torch.allclose(x, torch.tensor([2 / 3, 0, -2 / 3])) and y.tolist() == [0.0, 0.0, 0.0]  # token centres
    q_best, _, q_mutual, q_x, _ = q[0, :, 0]
    assert torch.allclose(q_best, torch.tensor([1.0, 1.0, b])) and q_mutual.tolist() == [1.0, 1.0, 0.0]
    assert torch.allclose(q_x, torch.tensor([2 / 3, 0, 0]))


def test_token_match_model_reads_the_correspondences():
    model = hybrid(token_match="mnn")
    assert model.vit.patch_embed.proj[0].in_channels == 48 + 5
    ref = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = model.tokens(ref)
        same = model.forward_tokens(t, t)
        other = model.forward_tokens(t, model.tokens(torch.randn(2, 3, 32, 32)))
    assert same.shape == (2,) and not torch.allclose(same, other, atol=1e-4)
    with pytest.raises(ValueError, match="hybrid stem"):
        build_pair_model(default_model_args(token_match="mnn"))
    with pytest.raises(ValueError, match="token_match"):
        hybrid(token_match="dense")


def test_correspondence_scores_rank_a_copy_above_a_stranger():
    from pair_vit.pair.hybrid import correspondence_scores

    torch.manual_seed(0)
    ref = torch.randn(1, 8, 3, 3)
    copy = ref + 0.1 * torch.randn(1, 8, 3, 3)  # the same tokens, slightly perturbed
    stranger = torch.randn(1, 8, 3, 3)
    scores = correspondence_scores(torch.cat([ref, ref]), torch.cat([copy, stranger]))
    assert scores["mutual"][0] == 1.0 and scores["confident_mutual"][0] == 1.0
    assert scores["similarity"][0] > 0.9 > scores["similarity"][1]
    assert scores["mutual"][1] < 1.0 and scores["confident_mutual"][1] < 0.5
