"""Pair-ViT scoring of a shortlist: query views, decoding cache, chunked resumable scoring."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pair_vit
from pair_vit import data
from pair_vit.pair import scoring as ps
from pair_vit.pair.inputs import normalise_uint8, preprocess
from pair_vit.pair.model import build_pair_model, default_model_args

TINY = dict(input_size=[32, 64], backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_pair_model(default_model_args(**TINY)).eval()


@pytest.fixture()
def photos(tmp_path) -> dict[str, Path]:
    src = sorted(data.list_images(pair_vit.demo_dir() / "clothing_cc0").values())[:4]
    out = {}
    for p in src:
        out[p.stem] = Path(shutil.copy(p, tmp_path / p.name))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out["bad"] = tmp_path / "bad.jpg"
    return out


def test_expand_views_groups_and_errors():
    assert ps.expand_views(["full", "halves", "left"]) == ["full", "left", "right", "top", "bottom"]
    assert ps.expand_views(["rotations"]) == ["rot90", "rot180", "rot270"]
    with pytest.raises(ValueError, match="unknown pair view 'middle'"):
        ps.expand_views(["middle"])
    with pytest.raises(ValueError, match="at least one"):
        ps.expand_views([])


def test_view_image_geometry():
    im = Image.new("RGB", (100, 60))
    assert ps.view_image(im, "full") is im
    assert ps.view_image(im, "left").size == (50, 60) and ps.view_image(im, "bottom").size == (100, 30)
    assert ps.view_image(im, "center").size == (60, 36)
    assert ps.view_image(im, "rot90").size == (60, 100) and ps.view_image(im, "hflip").size == (100, 60)
    assert ps.view_image(Image.new("RGB", (1, 1)), "left").size == (1, 1)  # never empty


def test_uint8_path_matches_preprocess():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    x = normalise_uint8(ps.to_uint8(im, (16, 16))[None], (0.5,) * 3, (0.5,) * 3)[0]
    torch.testing.assert_close(x, preprocess(im, (16, 16)), atol=1e-5, rtol=0)


def test_tensor_cache_reports_bad_images_once(photos):
    report = data.SkipReport()
    cache = ps.TensorCache(photos, (16, 16), report, capacity=2)
    assert cache.get("bad") is None and cache.get("bad") is None
    assert len(report) == 1 and "bad.jpg" in str(report.entries[0][0])
    ids = [i for i in photos if i != "bad"]
    for i in ids:
        assert cache.get(i).shape == (3, 16, 16) and cache.get(i).dtype == torch.uint8
    assert len(cache._cache) == 2  # bounded


def shortlist_of(photos, queries):
    refs = [i for i in photos if i != "bad"]
    return pd.DataFrame([(q, r, 0.5) for q in queries for r in refs + ["bad"]],
                        columns=["query_id", "reference_id", "score"])


def test_score_chunk_max_over_views_and_skips_unreadable(model, photos):
    report = data.SkipReport()
    refs = [i for i in photos if i != "bad"]
    rows = shortlist_of(photos, [refs[0], "bad"])
    cache = ps.TensorCache(photos, model.half_size, report)
    out = ps.score_chunk(model, rows, ["full", "rot180"], cache, cache, batch_size=3, amp=False)
    assert len(out) == len(refs)  # the unreadable query and reference get no rows
    assert set(out.query_id) == {refs[0]} and "bad" not in set(out.reference_id)
    np.testing.assert_allclose(out.logit, np.maximum(out.logit_full, out.logit_rot180))
    # the full view is exactly what the model gives for the two preprocessed images
    ref = ps.to_uint8(data.load_image(photos[refs[1]], max_side=ps.LOAD_SIDE), model.half_size)
    query = ps.to_uint8(data.load_image(photos[refs[0]], max_side=ps.LOAD_SIDE), model.half_size)
    norm = lambda x: normalise_uint8(x[None], model.model_args["mean"], model.model_args["std"])  # noqa: E731
    with torch.inference_mode():
        expected = model(norm(ref), norm(query)).item()
    assert out.set_index("reference_id").logit_full[refs[1]] == pytest.approx(expected, abs=1e-4)


def test_score_shortlist_resumes_from_cached_chunks(model, photos, tmp_path, monkeypatch, drop_chunk):
    refs = [i for i in photos if i != "bad"]
    shortlist = shortlist_of(photos, refs)
    cache = tmp_path / "pairs"
    first, n_first = ps.score_shortlist(model, shortlist, photos, photos, ["full"], data.SkipReport(), cache,
                                        chunk_queries=2, amp=False)
    assert n_first == len(refs) * len(refs) and len(list(cache.glob("chunk_*.csv"))) == 2
    drop_chunk(cache, sorted(set(shortlist.query_id))[2])  # as if killed during the second chunk
    calls = []
    real = ps.score_chunk
    monkeypatch.setattr(ps, "score_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, n_again = ps.score_shortlist(model, shortlist, photos, photos, ["full"], data.SkipReport(), cache,
                                        chunk_queries=2, amp=False)
    assert len(calls) == 1 and n_again == 2 * len(refs)
    pd.testing.assert_frame_equal(first, again, check_dtype=False, atol=1e-5)


def test_score_shortlist_shares_chunks_between_processes(model, photos):
    refs = [i for i in photos if i != "bad"]
    shortlist = shortlist_of(photos, refs)
    parts = [ps.score_shortlist(model, shortlist, photos, photos, ["full"], data.SkipReport(), None,
                                chunk_queries=1, amp=False, rank=r, world=2)[0] for r in range(2)]
    assert set(parts[0].query_id).isdisjoint(parts[1].query_id)
    assert set(parts[0].query_id) | set(parts[1].query_id) == set(refs)


def test_throughput_is_positive(model):
    assert ps.timed_pairs_per_second(model, n=8, batch_size=4) > 0
