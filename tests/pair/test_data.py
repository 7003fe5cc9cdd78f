"""Training pairs: groups, labels, one edit chain per group, donors, determinism, bad photos, sharding."""
import shutil

import numpy as np
import pytest
import torch

import pair_vit.edits as edits
from pair_vit import data
from pair_vit.pair import data as pdata
from pair_vit.pair.model import pair_metrics

SETTINGS = dict(group_size=3, load_side=96, half_height=32, groups_per_step=2, ramp_steps=10)


@pytest.fixture(scope="module")
def photos(train_photos):
    return pdata.scan_photos(data.list_images(train_photos), data.SkipReport())


def groups_of(photos, seed=0, **overrides):
    table = pdata.nearest_neighbours(photos.vectors, 5)
    return pdata.PairGroups(photos.paths, table, pdata.GroupSettings(**{**SETTINGS, **overrides}), seed=seed)


def test_group_item_layout(photos):
    item = groups_of(photos)[0]
    assert item["refs"].shape == item["queries"].shape == (3, 3, 32, 32)
    assert len(set(item["ids"])) == 3 and set(item["ids"]) <= set(photos.ids)
    assert item["edits"] and all(name in edits.EDIT_FAMILIES for name in item["edits"])
    assert item["step"] == 0 and item["skipped"] == []


def test_pair_indices_labels():
    ref_idx, query_idx, labels = pdata.pair_indices(n_groups=2, group_size=3)
    assert len(labels) == 2 * 9 and labels.sum() == 2 * 3  # G positives and G*(G-1) negatives per group
    assert torch.equal(labels.bool(), ref_idx == query_idx)
    assert ((ref_idx // 3) == (query_idx // 3)).all()  # pairs never cross groups


def test_one_edit_chain_for_the_whole_group(photos, monkeypatch):
    calls = []
    real = edits.apply_chain

    def spy(image, chain, donors=()):
        calls.append([e.to_dict() for e in chain])
        return real(image, chain, donors)

    monkeypatch.setattr(edits, "apply_chain", spy)
    for index in range(3):
        calls.clear()
        item = groups_of(photos)[index]
        assert len(calls) == 3 and all(c == calls[0] for c in calls)
        assert [c["name"] for c in calls[0]] == item["edits"]


def test_donors_come_from_outside_the_group(photos):
    groups = groups_of(photos, families=["collage", "paste_onto"], n_edits=(1, 1))
    for index in range(4):
        item = groups[index]
        assert item["donor_ids"] and not set(item["donor_ids"]) & set(item["ids"])


def test_deterministic_for_a_seed(photos):
    a, b = groups_of(photos)[5], groups_of(photos)[5]
    assert a["ids"] == b["ids"] and a["edits"] == b["edits"]
    assert torch.equal(a["refs"], b["refs"]) and torch.equal(a["queries"], b["queries"])
    other = groups_of(photos, seed=1)[5]
    assert other["ids"] != a["ids"] or other["edits"] != a["edits"]


def test_workers_give_the_same_batches(photos):
    groups = groups_of(photos)
    loaders = [torch.utils.data.DataLoader(groups, sampler=pdata.StepSampler(0, 2, 2), batch_size=2,
                                           num_workers=w, collate_fn=pdata.collate_groups) for w in (0, 2)]
    for a, b in zip(*loaders):
        assert a["ids"] == b["ids"] and torch.equal(a["queries"], b["queries"])


def test_curriculum_and_progressive_resolution():
    s = pdata.GroupSettings(intensity_start=0.2, intensity_end=1.0, ramp_steps=100, half_height=112,
                            progressive_min_height=48)
    assert s.intensity_range(0) == (0.2, 0.2) and s.intensity_range(50)[1] == pytest.approx(0.6)
    assert s.intensity_range(500) == (0.2, 1.0)
    assert s.half_size(0) == (48, 48) and s.half_size(100) == (112, 112)
    assert all(h % 16 == 0 and 48 <= h <= 112 for h, _ in map(s.half_size, range(0, 120, 7)))
    fixed = pdata.GroupSettings(fixed_intensity=(0.3, 0.9), progressive_min_height=48)
    assert fixed.intensity_range(0) == (0.3, 0.9) and fixed.half_size(0) == (112, 112)


def test_corrupt_images_are_skipped_and_counted(train_photos, tmp_path):
    bad = tmp_path / "photos"
    shutil.copytree(train_photos, bad)
    (bad / "not_an_image.jpg").write_text("hello")
    first = sorted(bad.glob("*.jpg"))[0]
    (bad / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    report = data.SkipReport()
    found = pdata.scan_photos(data.list_images(bad), report)
    assert len(report) == 2 and len(found.ids) == 12
    assert "not_an_image" not in found.ids and "truncated" not in found.ids
    # A photo that breaks after the scan is replaced inside the group and reported by the item.
    victim = found.paths[0]
    victim.write_bytes(b"")
    groups = groups_of(found)
    items = [groups[i] for i in range(12)]
    hit = [it for it in items if it["skipped"]]
    assert hit and all(len(it["ids"]) == 3 and victim.stem not in it["ids"] for it in hit)
    assert hit[0]["skipped"][0] == (str(victim), "empty file")


def test_too_few_photos_is_a_clear_error(photos):
    with pytest.raises(ValueError, match="need at least 3"):
        pdata.PairGroups(photos.paths[:2], np.zeros((2, 1), np.int64), pdata.GroupSettings(group_size=3))
    with pytest.raises(ValueError, match="need at least 2"):
        pdata.check_enough(1, 2, "folder")


def test_groups_use_look_alikes(photos):
    groups = groups_of(photos, random_fraction=0.0)
    table = groups.neighbours
    rng = np.random.default_rng(0)
    members = groups.members(rng, 0)
    assert set(members[1:]) <= set(table[members[0]].tolist())


def test_step_sampler_shards_without_overlap():
    shards = [list(pdata.StepSampler(3, 6, per_step=4, rank=r, world=2)) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(12, 24))
    assert len(pdata.StepSampler(3, 6, 4, 0, 2)) == 6
    with pytest.raises(ValueError, match="evenly"):
        pdata.StepSampler(0, 1, per_step=3, world=2)


def test_heldout_split_is_stable(photos):
    train, held = pdata.split_heldout(photos, seed=0, fraction=0.5)
    assert sorted(train.ids + held.ids) == sorted(photos.ids) and not set(train.ids) & set(held.ids)
    assert len(train.vectors) == len(train.ids)
    assert [pdata.heldout_of(i, 0, 0.5) for i in photos.ids] == [pdata.heldout_of(i, 0, 0.5) for i in photos.ids]


def test_pair_metrics():
    ri, qi, labels = pdata.pair_indices(4, 3)
    perfect = pair_metrics(labels.numpy() * 0.8 + 0.1, labels.numpy(), 3)
    assert perfect["auc"] == perfect["ap"] == perfect["accuracy"] == perfect["rank1"] == 1.0
    assert perfect["pairs"] == 36
    flat = pair_metrics(np.full(36, 0.5, np.float32), labels.numpy(), 3)
    assert flat["auc"] == 0.5 and flat["ap"] < 0.5


def test_manifest_hash_changes_with_the_photos(train_photos, tmp_path):
    images = data.list_images(train_photos)
    h = pdata.manifest_hash(images)
    assert h == pdata.manifest_hash(dict(images)) and h != pdata.manifest_hash(dict(list(images.items())[1:]))


def test_descriptor_look_alikes(train_photos, tmp_path):
    from pair_vit.checkpoint import save_checkpoint
    from pair_vit.descriptor.model import build_descriptor

    args = {"backbone": "resnet10t", "embed_dim": 16, "image_size": 32, "gem_p": 3.0}
    path = save_checkpoint(tmp_path / "desc.pt", kind="descriptor", model_args=args,
                           model_state=build_descriptor(args).state_dict())
    found = pdata.find_photos(data.list_images(train_photos), data.SkipReport(), descriptor_checkpoint=str(path))
    assert len(found.ids) == 12 and found.vectors.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(found.vectors, axis=1), 1.0, atol=1e-3)
    assert pdata.nearest_neighbours(found.vectors, 4).shape == (12, 4)


def test_a_failing_edit_gets_a_new_chain_for_the_whole_group(photos, monkeypatch):
    real, calls = edits.apply_chain, []

    def flaky(image, chain, donors=()):
        calls.append([e.name for e in chain])
        if len(calls) == 2:  # the second member of the first chain breaks
            raise RuntimeError("odd photo")
        return real(image, chain, donors)

    monkeypatch.setattr(edits, "apply_chain", flaky)
    item = groups_of(photos)[0]
    assert len(calls) == 2 + 3 and all(c == item["edits"] for c in calls[2:])
