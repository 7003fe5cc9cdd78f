"""pair_vit.match.verify: SIFT RANSAC inliers of shortlisted pairs, unreadable images, resumable chunks."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from pair_vit import data
from pair_vit.match import verify as V


@pytest.fixture(scope="module")
def photos(train_photos, tmp_path_factory):
    """Three demo photos, an edited copy of the first (cropped, shrunk, JPEG) and an unreadable file."""
    out = tmp_path_factory.mktemp("verify")
    paths = sorted(data.list_images(train_photos).values())[:3]
    images = {f"P{i}": p for i, p in enumerate(paths)}
    original = data.load_image(paths[0])
    w, h = original.size
    original.crop((w // 8, h // 8, w, h)).resize((w // 2, h // 2)).save(out / "copy.jpg", quality=60)
    (out / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return {**images, "copy": out / "copy.jpg", "bad": out / "bad.jpg"}


def shortlist(query, refs):
    return pd.DataFrame([(query, r, 0.5) for r in refs], columns=["query_id", "reference_id", "score"])


def test_a_copy_has_many_more_inliers_than_other_photos(photos):
    report = data.SkipReport()
    rows = shortlist("copy", ["P0", "P1", "P2", "bad"])
    out = V.verify_chunk(rows, V.KeypointCache(photos, report), V.KeypointCache(photos, report)).set_index(
        "reference_id")
    assert list(out.columns) == ["query_id", "inliers"] and "bad" not in out.index  # no row for it
    assert out.inliers["P0"] >= 20 and out.inliers["P0"] > 3 * max(out.inliers["P1"], out.inliers["P2"], 1)
    assert len(report) == 1 and "bad.jpg" in str(report.entries[0][0])


def test_keypoints_are_stored_in_float16_and_an_image_matches_itself():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((256, 256), Image.NEAREST)
    features = V.keypoints(image)
    assert features[1].dtype == np.float16 and V._inliers([features], [features]) >= 20


@pytest.mark.parametrize("edit", [ImageOps.invert, ImageOps.mirror])
def test_an_inverted_or_mirrored_copy_is_verified_through_the_query_variants(photos, tmp_path, edit):
    copy = tmp_path / "copy.png"
    edit(data.load_image(photos["P0"])).save(copy)
    paths = {**photos, "copy": copy}
    rows = shortlist("copy", ["P0", "P1"])
    refs = V.KeypointCache(paths, data.SkipReport())
    plain = V.verify_chunk(rows, V.KeypointCache(paths, data.SkipReport()), refs)
    both = V.verify_chunk(rows, V.KeypointCache(paths, data.SkipReport(), variants=V.QUERY_VARIANTS),
                          refs).set_index("reference_id")
    if edit is ImageOps.invert:
        assert plain.inliers.max() < 10  # SIFT of the query as it is misses the copy
    assert both.inliers["P0"] > plain.set_index("reference_id").inliers["P0"]
    assert both.inliers["P0"] >= 20 and both.inliers["P0"] > 3 * max(both.inliers["P1"], 1)
    with pytest.raises(ValueError, match="unknown image variants"):
        V.KeypointCache(paths, data.SkipReport(), variants=("rotated",))


def test_verify_shortlist_resumes_from_cached_chunks(photos, tmp_path, monkeypatch, drop_chunk):
    rows = pd.concat([shortlist(q, ["P0", "P1"]) for q in ("copy", "P2", "bad")], ignore_index=True)
    first, n_first = V.verify_shortlist(rows, photos, photos, data.SkipReport(), tmp_path, chunk_queries=1)
    assert n_first == 4 and set(first.query_id) == {"copy", "P2"}  # the unreadable query gets no rows
    drop_chunk(tmp_path, "copy")  # as if killed during the last query ("copy")
    calls = []
    real = V.verify_chunk
    monkeypatch.setattr(V, "verify_chunk", lambda *a: calls.append(1) or real(*a))
    again, n_again = V.verify_shortlist(rows, photos, photos, data.SkipReport(), tmp_path, chunk_queries=1)
    assert len(calls) == 1 and n_again == 2
    pd.testing.assert_frame_equal(first, again)
