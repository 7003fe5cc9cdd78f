"""Stage 1: folder embedding, multi-view merge, the faiss reference index, score normalisation, recall@k."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import pair_vit
from pair_vit import data
from pair_vit.match import index as ix
from pair_vit.descriptor.views import VIEW_BOXES, embed_boxes, merge_views, n_views, view_boxes

SMALL_ARGS = {"backbone": "resnet18", "embed_dim": 32, "image_size": 64, "gem_p": 3.0}


@pytest.fixture(scope="module")
def model():
    from pair_vit.descriptor.model import build_descriptor

    torch.manual_seed(0)
    return build_descriptor(dict(SMALL_ARGS)).eval()


@pytest.fixture(scope="module")
def demo_photos() -> dict:
    photos = data.list_images(pair_vit.demo_dir() / "clothing_cc0")
    return dict(list(photos.items())[:6])


def unit(rows) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


META = {"model_args": SMALL_ARGS, "fingerprint": "abc123"}


# ----------------------------------------------------------------------------- the index


def test_round_trip_gives_identical_results(tmp_path):
    refs = random_unit(50, 16)
    index = ix.ReferenceIndex.build([f"R{i}" for i in range(50)], refs, metadata=META)
    queries = random_unit(7, 16, seed=1)
    before = index.search(queries, 5)
    index.save(tmp_path / "idx")
    loaded = ix.ReferenceIndex.load(tmp_path / "idx", expected_model_args=SMALL_ARGS, expected_fingerprint="abc123",
                                    expected_dim=16)
    after = loaded.search(queries, 5)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.ids == index.ids and loaded.metadata["fingerprint"] == "abc123" and loaded.factory == "Flat"
    # saving again replaces the data files instead of piling them up
    loaded.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").glob("index.*.faiss"))) == 1


def test_search_is_exact_inner_product_best_first():
    refs = random_unit(30, 8)
    index = ix.ReferenceIndex.build([f"R{i}" for i in range(30)], refs)
    scores, ids = index.search(refs[:3], 4)
    assert list(ids[:, 0]) == ["R0", "R1", "R2"]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    scores, ids = index.search(refs[:2], 100)  # k larger than the collection
    assert scores.shape == (2, 30)


def test_add_extends_and_refuses_duplicate_ids():
    refs = random_unit(12, 8)
    index = ix.ReferenceIndex.build([f"R{i}" for i in range(10)], refs[:10])
    index.add(["R10", "R11"], refs[10:])
    assert len(index) == 12 and "R11" in index
    _, ids = index.search(refs[11:], 1)
    assert ids[0, 0] == "R11"
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["R3"], refs[:1])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["X", "X"], refs[:2])
    with pytest.raises(ValueError, match="dimension"):
        index.add(["Y"], random_unit(1, 4))


def test_load_refuses_other_model_weights_or_dimension(tmp_path):
    ix.ReferenceIndex.build(["a", "b"], random_unit(2, 16), metadata=META).save(tmp_path)
    with pytest.raises(ix.IndexMismatchError, match=r"backbone='resnet18' in the index, 'resnet50' now"):
        ix.ReferenceIndex.load(tmp_path, expected_model_args={**SMALL_ARGS, "backbone": "resnet50"})
    with pytest.raises(ix.IndexMismatchError, match=r"16-dimensional .* outputs 32"):
        ix.ReferenceIndex.load(tmp_path, expected_dim=32)
    with pytest.raises(ix.IndexMismatchError, match="other descriptor weights"):
        ix.ReferenceIndex.load(tmp_path, expected_model_args=SMALL_ARGS, expected_fingerprint="fff")
    with pytest.raises(FileNotFoundError, match="no reference index"):
        ix.ReferenceIndex.load(tmp_path / "nowhere")


def test_empty_reference_set_is_a_clear_error(model, demo_photos, tmp_path):
    with pytest.raises(ValueError, match="empty reference set"):
        ix.ReferenceIndex.build([], np.zeros((0, 16), np.float32))
    (tmp_path / "refs").mkdir()
    with pytest.raises(ValueError, match="empty reference set"):
        ix.shortlist(model, demo_photos, data.list_images(tmp_path / "refs"), k=3)


def test_ivf_pq_and_hnsw_factories_on_random_vectors(tmp_path):
    refs = random_unit(600, 32)
    ids = [f"R{i}" for i in range(600)]
    for factory in ("IVF16,PQ8x4", "HNSW32"):  # 4-bit PQ codes: 16 centroids, fast to train
        index = ix.ReferenceIndex.build(ids, refs, factory=factory, nprobe=16)
        _, found = index.search(refs[:50], 5)
        assert np.mean(found[:, 0] == np.asarray(ids[:50], dtype=object)) >= 0.9, factory
    index.save(tmp_path)
    assert ix.ReferenceIndex.load(tmp_path).factory == "HNSW32"
    with pytest.raises(ValueError, match="cannot train"):
        ix.ReferenceIndex.build(ids[:20], refs[:20], factory="IVF64,Flat")
    with pytest.raises(ValueError, match="invalid faiss index factory"):
        ix.ReferenceIndex.build(ids, refs, factory="NotAnIndex")


# ----------------------------------------------------------------------------- multi-view


def test_view_boxes_cover_the_image():
    assert [n_views(v) for v in ("full", "halves", "grid")] == [1, 5, 14]
    boxes = view_boxes(90, 60, "grid")
    assert boxes[0] == (0, 0, 90, 60) and boxes[1] == (0, 0, 45, 60) and boxes[5] == (0, 0, 30, 20)
    assert boxes[-1] == (60, 40, 90, 60)
    assert all(r > l and b > t for l, t, r, b in view_boxes(1, 1, "grid"))
    with pytest.raises(ValueError, match="unknown views"):
        n_views("quarters")
    assert len(VIEW_BOXES["halves"]) == 5


def test_a_crop_view_that_matches_better_wins_and_views_merge_by_max():
    e = np.eye(4, dtype=np.float32)
    index = ix.ReferenceIndex.build(["A", "B", "C"], e[:3])
    full_view = unit([[0.7, 0.0, 0.0, 0.71]])  # the whole query: most like A (0.70)
    crop_view = unit([[0.3, 0.9, 0.0, 0.3]])  # one crop: most like B (0.90), a bit like A (0.30)
    other_query = unit([[0.0, 0.0, 1.0, 0.0]])
    vectors = np.concatenate([full_view, crop_view, other_query])
    sub = ix.search_views(index, ["q", "r"], vectors, np.array([0, 0, 1]), k=3, subview_penalty=0.0)
    q = sub[sub.query_id == "q"]
    assert list(q.reference_id) == ["B", "A", "C"]
    assert q.score.iloc[0] == pytest.approx(crop_view[0, 1], abs=1e-6)
    assert q.score.iloc[1] == pytest.approx(full_view[0, 0], abs=1e-6)  # A: max(0.70, 0.30), not a sum
    assert not sub.duplicated(["query_id", "reference_id"]).any()
    assert sub[sub.query_id == "r"].reference_id.iloc[0] == "C"


def test_subview_penalty_lowers_every_view_but_the_whole_image():
    e = np.eye(4, dtype=np.float32)
    index = ix.ReferenceIndex.build(["A", "B", "C"], e[:3])
    full_view = unit([[0.7, 0.0, 0.0, 0.71]])  # A: 0.70
    crop_view = unit([[0.0, 0.72, 0.0, 0.69]])  # B: 0.72, by a hair over the whole image's best
    other_full = unit([[0.0, 0.0, 1.0, 0.0]])  # query r: its only view is the whole image, C: 1.0
    vectors = np.concatenate([full_view, crop_view, other_full])
    plain = ix.search_views(index, ["q", "r"], vectors, np.array([0, 0, 1]), k=2, subview_penalty=0.0)
    assert list(plain[plain.query_id == "q"].reference_id) == ["B", "A"]
    sub = ix.search_views(index, ["q", "r"], vectors, np.array([0, 0, 1]), k=2, subview_penalty=0.05)
    q = sub[sub.query_id == "q"]
    assert list(q.reference_id) == ["A", "B"]
    assert q.score.iloc[0] == pytest.approx(full_view[0, 0], abs=1e-6)  # the whole image keeps its cosine
    assert q.score.iloc[1] == pytest.approx(crop_view[0, 1] - 0.05, abs=1e-6)
    assert sub[sub.query_id == "r"].score.iloc[0] == pytest.approx(1.0, abs=1e-6)


def test_reference_views_merge_by_max_with_their_penalty_and_count_as_one_reference():
    e = np.eye(4, dtype=np.float32)
    # A: whole image e0 and one sub-view e1; B: whole image only, e2
    index = ix.ReferenceIndex.build(["A", "B"], e[[0, 1, 2]], view_owner=np.array([0, 0, 1]),
                                    metadata={"reference_views": "halves"})
    assert len(index) == 2 and index.n_rows == 3 and index.ids == ["A", "B"]
    crop_query = unit([[0.0, 0.8, 0.6, 0.0]])  # a crop of A (its sub-view 0.8), a bit like B (0.6)
    scores, ids = index.search(crop_query, 2)  # k references -> up to k x 2 rows, A twice
    assert sorted(ids[0]) == ["A", "A", "B"]
    sub = ix.search_views(index, ["q"], crop_query, np.array([0]), k=2, reference_penalty=0.1)
    assert list(sub.reference_id) == ["A", "B"]
    assert sub.score.tolist() == pytest.approx([0.8 - 0.1, 0.6], abs=1e-6)
    sub = ix.search_views(index, ["q"], crop_query, np.array([0]), k=2, reference_penalty=0.3)
    assert list(sub.reference_id) == ["B", "A"]  # the whole image of B now beats A's penalised sub-view
    assert sub.score.tolist() == pytest.approx([0.6, 0.5], abs=1e-6)


def test_reference_views_round_trip_add_and_refuse_other_views(tmp_path):
    vectors = random_unit(9, 8)
    index = ix.ReferenceIndex.build(["A", "B"], vectors[:6], view_owner=np.array([0, 0, 0, 1, 1, 1]),
                                    metadata={"reference_views": "halves"})
    index.add(["C"], vectors[6:], np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="do not line up"):
        index.add(["D", "E"], vectors[:2], np.array([0, 0]))  # E has no row
    index.save(tmp_path / "idx")
    loaded = ix.ReferenceIndex.load(tmp_path / "idx", expected_reference_views="halves")
    assert loaded.ids == ["A", "B", "C"] and loaded.n_rows == 9 and loaded.reference_views == "halves"
    query = vectors[7:8]  # a sub-view of C
    for penalty in (0.0, 0.1):
        np.testing.assert_array_equal(index.search(query, 3, subview_penalty=penalty)[1],
                                      loaded.search(query, 3, subview_penalty=penalty)[1])
    with pytest.raises(ix.IndexMismatchError, match="reference views 'halves', not the 'full' asked for"):
        ix.ReferenceIndex.load(tmp_path / "idx", expected_reference_views="full")
    ix.ReferenceIndex.build(["Z"], vectors[:1]).save(tmp_path / "old")  # an index saved before reference views
    assert ix.ReferenceIndex.load(tmp_path / "old", expected_reference_views="full").reference_views == "full"


def test_update_reference_index_embeds_reference_views(model, demo_photos):
    refs = dict(list(demo_photos.items())[:3])
    index = ix.update_reference_index(model, refs, views="halves")
    assert len(index) == 3 and index.n_rows == 3 * n_views("halves") and index.reference_views == "halves"
    more = dict(list(demo_photos.items())[3:5])
    ix.update_reference_index(model, more, index, views="halves")
    assert len(index) == 5 and index.n_rows == 5 * n_views("halves")
    with pytest.raises(ix.IndexMismatchError, match="reference views 'halves', not 'full'"):
        ix.update_reference_index(model, more, index, views="full")
    with pytest.raises(ValueError, match="unknown reference views"):
        ix.update_reference_index(model, more, None, views="regions")
    # an unedited reference still finds itself first, with its whole-image similarity
    sub = ix.shortlist(model, refs, refs, k=2, reference_views="halves")
    top = sub.groupby("query_id").head(1)
    assert (top.query_id == top.reference_id).all() and np.allclose(top.score, 1.0, atol=1e-4)


def test_subview_mask_marks_all_but_the_first_view_of_each_image():
    np.testing.assert_array_equal(ix.subview_mask(np.array([0, 0, 0, 1, 2, 2])),
                                  [False, True, True, False, False, True])
    np.testing.assert_array_equal(ix.subview_mask(np.array([], dtype=np.int64)), np.zeros(0, bool))


def test_merge_views_keeps_k_per_query_and_drops_missing():
    scores = np.array([[0.9, 0.5], [0.8, -np.inf]], np.float32)
    refs = np.array([["A", "B"], ["C", None]], dtype=object)
    sub = merge_views(scores, refs, np.array([0, 0]), ["q"], k=2)
    assert list(sub.reference_id) == ["A", "C"]


def test_embed_folder_views_and_owners(model, demo_photos, monkeypatch):
    monkeypatch.setenv("PAIR_VIT_BF16", "1")  # the bf16 path, even on a CPU without native bf16
    photos = dict(list(demo_photos.items())[:3])
    ids, vectors, owner = ix.embed_folder(model, photos, batch_size=8, views="halves")
    assert ids == list(photos) and vectors.shape == (15, 32) and vectors.dtype == np.float32
    assert list(owner) == [0] * 5 + [1] * 5 + [2] * 5
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # bf16 autocast costs little accuracy: fp32 and bf16 descriptors of the same views nearly coincide
    _, fp32, _ = ix.embed_folder(model, photos, batch_size=8, views="halves", amp=False)
    assert (fp32 * vectors).sum(1).min() > 0.999


def test_embed_boxes_reads_each_useful_box_once(model, demo_photos, tmp_path):
    photos = dict(list(demo_photos.items())[:3])
    a, b, c = photos
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    boxes = {a: np.array([[0.0, 0.0, 0.5, 0.5], [0.001, 0.0, 0.5, 0.5],  # the second repeats the first (to 0.01)
                          [0.0, 0.0, 1.0, 0.95],  # almost the whole image: the full view has it
                          [0.2, 0.2, 0.22, 0.9],  # a sliver
                          [0.5, 0.5, 1.0, 1.0]], np.float32),
             b: np.zeros((0, 4), np.float32), "broken": np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)}
    report = data.SkipReport()
    images = {a: photos[a], b: photos[b], c: photos[c], "broken": broken}
    ids, vectors, owner = embed_boxes(model, images, boxes, amp=False, report=report)
    assert ids == [a] and owner.tolist() == [0, 0] and vectors.shape == (2, 32)  # c has no box, b an empty list
    assert [path.name for path, _ in report] == ["broken.jpg"]
    # a view is the descriptor of the crop itself
    from pair_vit.descriptor.model import preprocess

    image = data.load_image(photos[a], max_side=3 * 64)
    w, h = image.size
    crop = image.crop((0, 0, round(0.5 * w), round(0.5 * h)))
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(model(preprocess(crop, 64)[None]).float(), dim=1).numpy()[0]
    np.testing.assert_allclose(vectors[0], direct, atol=1e-5)
    # embed_folder(boxes=) reads the same boxes after each image's own views, in the same pass
    for views in ("regions", "full"):  # the regions' decode, and a coarser one (the boxes decode again)
        f_ids, f_vectors, f_owner = ix.embed_folder(model, images, amp=False, views=views, report=report,
                                                    boxes=boxes)
        plain_ids, plain, plain_owner = ix.embed_folder(model, images, amp=False, views=views)
        assert f_ids == plain_ids == [a, b, c] and [path.name for path, _ in report] == ["broken.jpg"]
        extra = np.flatnonzero(f_owner == 0)[-2:]  # a's two useful boxes follow its own views
        assert len(f_owner) == len(plain_owner) + 2 and f_owner[extra].tolist() == [0, 0]
        np.testing.assert_allclose(f_vectors[extra], vectors, atol=1e-5)
        np.testing.assert_allclose(np.delete(f_vectors, extra, 0), plain, atol=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_exact_duplicate_of_a_reference_ranks_first(model, demo_photos, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for path in demo_photos.values():
        shutil.copy(path, refs / path.name)
    queries = tmp_path / "queries"
    queries.mkdir()
    target = sorted(demo_photos)[2]
    shutil.copy(demo_photos[target], queries / "Q0.jpg")
    for views in ("full", "halves"):
        sub = ix.shortlist(model, data.list_images(queries), data.list_images(refs), k=4, views=views)
        assert len(sub) == 4 and sub.reference_id.iloc[0] == target
        assert sub.score.iloc[0] == pytest.approx(1.0, abs=2e-3)
        assert sub.score.iloc[0] > sub.score.iloc[1]


def test_unreadable_images_are_skipped_reported_and_get_no_rows(model, demo_photos, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (queries / "empty.png").write_bytes(b"")
    first = next(iter(demo_photos.values()))
    shutil.copy(first, queries / "good.jpg")
    references = {**demo_photos, "bad_ref": queries / "broken.jpg"}
    report = data.SkipReport()
    sub = ix.shortlist(model, data.list_images(queries), references, k=3, report=report, num_workers=1)
    assert set(sub.query_id) == {"good"} and "bad_ref" not in set(sub.reference_id)
    # broken.jpg is a query and a reference: one file, listed once
    assert sorted(p.name for p, _ in report) == ["broken.jpg", "empty.png"]


def test_score_normalisation_lowers_queries_similar_to_all_background():
    rng = np.random.default_rng(0)
    hub = unit([[1.0] + [0.0] * 7])
    background = unit(hub + 0.2 * rng.normal(size=(20, 8)))  # background photos all resemble `hub`
    generic = unit(hub + 0.05 * rng.normal(size=(1, 8)))  # a query that resembles all of them
    specific = unit([[0.0, 1.0] + [0.0] * 6])  # a query unlike the background
    queries = np.concatenate([generic, specific])
    raw = np.array([[0.8], [0.8]], np.float32)  # same raw similarity to their best reference
    bg_index = ix.ReferenceIndex.build([f"B{i}" for i in range(20)], background)
    out = ix.normalise_scores(raw, queries, bg_index, n=3, beta=1.0)
    assert out[0, 0] < out[1, 0]
    top3 = np.sort(background @ queries.T, axis=0)[-3:]
    np.testing.assert_allclose(out[:, 0], 0.8 - top3.mean(axis=0), atol=1e-5)
    half = ix.normalise_scores(raw, queries, background, n=3, beta=0.5)  # plain vectors work too
    np.testing.assert_allclose(half[:, 0], 0.8 - 0.5 * top3.mean(axis=0), atol=1e-5)


def test_fingerprint_tracks_weights(model):
    from pair_vit.descriptor.model import build_descriptor

    torch.manual_seed(1)
    other = build_descriptor(dict(SMALL_ARGS))
    assert ix.model_fingerprint(model) == ix.model_fingerprint(model)
    assert ix.model_fingerprint(model) != ix.model_fingerprint(other)
    assert ix.index_metadata(model)["model_args"]["embed_dim"] == 32
