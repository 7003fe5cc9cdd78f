"""Localize, then verify: boxes from mutual nearest neighbours, crops, the localizing hybrid in training and
scoring (pair_vit.pair.localize)."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pair_vit import data, demo_dir
from pair_vit.pair import scoring
from pair_vit.pair.localize import FULL_BOX, LocalizeSettings, crop, fine_size, locate
from pair_vit.pair.model import build_pair_model, default_model_args, stem_input_stats

EXACT = LocalizeSettings(min_matches=4, quantile=0.0, margin=0.0, min_side=0.1, max_area=0.7)


def planted(positions, grid=4, channels=64, seed=0):
    """Reference tokens (1, C, 2, 2) of 4 orthogonal vectors; query tokens (1, C, grid, grid) of weak noise with the
    4 reference tokens planted at `positions` [(row, col)] (row-major reference order)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(channels, channels, generator=g))[0]
    ref = basis[:, :4].reshape(1, channels, 2, 2)
    query = 0.05 * torch.randn(1, channels, grid, grid, generator=g) + 0.3 * basis[:, 10:11].view(1, channels, 1, 1)
    for k, (row, col) in enumerate(positions):
        query[0, :, row, col] = basis[:, k]
    return ref, query


def test_box_is_the_extent_of_the_matched_tokens():
    ref, query = planted([(2, 2), (2, 3), (3, 2), (3, 3)])  # bottom-right quadrant of a 4 x 4 grid
    boxes, found = locate(ref, query, EXACT)
    # token centres 0.625 and 0.875, grown by half a token (0.125) on each side
    np.testing.assert_allclose(boxes.numpy(), [[0.5, 0.5, 1.0, 1.0]], atol=1e-6)
    assert found.tolist() == [True]


def test_margin_and_minimum_side():
    ref, query = planted([(1, 1), (1, 2), (2, 1), (2, 2)])  # centres 0.375 and 0.625
    grown = LocalizeSettings(min_matches=4, quantile=0.0, margin=0.5, min_side=0.1, max_area=0.9)
    boxes, _ = locate(ref, query, grown)  # side 0.25, grown by 0.5 x 0.25 + 0.125 on each side
    np.testing.assert_allclose(boxes.numpy(), [[0.125, 0.125, 0.875, 0.875]], atol=1e-6)
    ref, query = planted([(0, 0), (0, 1), (1, 0), (1, 1)], grid=8)  # the top-left corner of an 8 x 8 grid
    small = LocalizeSettings(min_matches=4, quantile=0.0, margin=0.0, min_side=0.5, max_area=0.7)
    boxes, found = locate(ref, query, small)  # a quarter-side box in the corner grows to half the side, inside
    np.testing.assert_allclose(boxes.numpy(), [[0.0, 0.0, 0.5, 0.5]], atol=1e-6)
    assert found.tolist() == [True]


def test_no_box_falls_back_to_the_whole_query():
    ref, query = planted([(2, 2), (2, 3), (3, 2), (3, 3)])
    too_few = LocalizeSettings(min_matches=5, quantile=0.0, margin=0.0, min_side=0.1)
    boxes, found = locate(ref, query, too_few)
    assert found.tolist() == [False] and boxes.tolist() == [list(FULL_BOX)]
    ref, query = planted([(0, 0), (0, 3), (3, 0), (3, 3)])  # matches in every corner: the box is the whole query
    boxes, found = locate(ref, query, EXACT)
    assert found.tolist() == [False] and boxes.tolist() == [list(FULL_BOX)]
    unrelated = torch.randn(1, 64, 2, 2)  # no token agrees: nothing is found, nothing is nan
    boxes, found = locate(unrelated, torch.zeros(1, 64, 4, 4), EXACT)
    assert torch.isfinite(boxes).all() and boxes.tolist() == [list(FULL_BOX)]


def test_crop_reads_the_box_from_the_right_image():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = torch.stack([10 * ys + xs, xs, ys])  # (3, 8, 8), linear: bilinear sampling is exact
    images = torch.stack([ramp, -ramp])
    out = crop(images, torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2), (4, 4), torch.tensor([1, 0]))
    torch.testing.assert_close(out[1], ramp[:, 2:6, 2:6])
    torch.testing.assert_close(out[0], -ramp[:, 2:6, 2:6])
    whole = crop(images, torch.tensor([list(FULL_BOX)]), (4, 4))  # the whole image, downscaled: pairs averaged
    torch.testing.assert_close(whole[0, 1, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))


def test_settings_round_trip_and_refuse_nonsense():
    assert LocalizeSettings.from_args(LocalizeSettings().to_args()) == LocalizeSettings()
    assert LocalizeSettings.from_args({}) is None and LocalizeSettings.from_args(None) is None
    assert fine_size((160, 160), LocalizeSettings()) == (320, 320)
    with pytest.raises(ValueError, match="unknown localize"):
        LocalizeSettings.from_args({"scael": 2})
    with pytest.raises(ValueError, match="quantile"):
        LocalizeSettings.from_args({"quantile": 0.7})
    with pytest.raises(ValueError, match="hybrid"):
        build_pair_model(default_model_args(stem="conv", localize={"scale": 2}))


def localizing(**settings):
    torch.manual_seed(0)
    args = default_model_args(input_size=[32, 64], stem="hybrid", stem_backbone="test_efficientnet",
                              backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, token_match="mnn",
                              localize=LocalizeSettings(**settings).to_args(),
                              **stem_input_stats("hybrid", "test_efficientnet"))
    return build_pair_model(args).eval()


def test_forward_reads_the_found_region_and_keeps_the_whole_query_elsewhere():
    model = localizing(min_matches=1, max_area=1.0)  # a box for every pair
    ref, query, fine = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    ri, qi = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        logits, found = model(ref, query, ri, qi, query_fine=fine)
        assert logits.shape == (4, 2) and found.all()
        torch.testing.assert_close(logits[:, 0], model(ref, query, ri, qi))  # column 0: the whole query
        assert not torch.allclose(logits[:, 1], logits[:, 0])
        never = localizing(min_matches=10_000)
        never.load_state_dict(model.state_dict())
        logits, found = never(ref, query, ri, qi, query_fine=fine)
        assert not found.any() and torch.equal(logits[:, 0], logits[:, 1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four demo photos and a collage query: photo 0 small in the bottom-right of photo 1, plus an unreadable one."""
    folder = tmp_path_factory.mktemp("localize")
    paths = sorted(p for p in demo_dir().rglob("*.jpg"))[:4]
    images = {f"p{i}": Image.open(p).convert("RGB") for i, p in enumerate(paths)}
    for name, image in images.items():
        image.save(folder / f"{name}.jpg")
    canvas = images["p1"].resize((240, 240))
    canvas.paste(images["p0"].resize((80, 80)), (150, 150))
    canvas.save(folder / "collage.jpg")
    (folder / "bad.jpg").write_bytes(b"not an image")
    return {p.stem: p for p in folder.iterdir()}


def test_scoring_adds_the_local_logit(photos):
    model = localizing(min_matches=1, max_area=1.0)
    report = data.SkipReport()
    refs = ["p0", "p1", "p2", "bad"]
    rows = pd.DataFrame([(q, r, 0.5) for q in ("collage", "p3", "bad") for r in refs],
                        columns=["query_id", "reference_id", "score"])
    cache = scoring.TensorCache(photos, model.half_size, report)
    tokens = scoring.TokenCache(model, cache, amp=False)  # a hybrid keeps reference tokens, not images
    out = scoring.score_chunk(model, rows, ["full"], cache, tokens, batch_size=4, amp=False)
    assert set(out.query_id) == {"collage", "p3"} and "bad" not in set(out.reference_id)
    assert {"logit_full", "logit_local", "logit"} <= set(out.columns)
    np.testing.assert_allclose(out.logit, np.maximum(out.logit_full, out.logit_local))
    assert (out.logit_local != out.logit_full).any()
    batched = scoring.score_chunk(model, rows, ["full"], cache, tokens, batch_size=1, amp=False)
    np.testing.assert_allclose(batched.logit_local, out.logit_local, atol=1e-4)  # batching changes nothing
