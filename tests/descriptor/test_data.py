"""Training data of the descriptor: edited-view cache, look-alike tables, batches, curriculum (a dozen photos)."""
import numpy as np
import pytest
import torch

from pair_vit.descriptor import data as DD
from pair_vit.descriptor.train import TrainDescriptorConfig
from pair_vit.training import nearest_neighbours


def small_config(**kw) -> TrainDescriptorConfig:
    values = dict(image_size=32, views_per_photo=2, cache_workers=1, batch_size=4, group_size=2, neighbours=3)
    return TrainDescriptorConfig(**{**values, **kw})


def items_of(folder):
    return [(p.stem, p) for p in sorted(folder.glob("*.jpg"))]


def test_pick_photos_puts_look_alike_groups_first():
    cfg = TrainDescriptorConfig(batch_size=8, group_size=4, hard_fraction=0.5)
    table = np.array([[(i + 1) % 50, (i + 2) % 50, (i + 3) % 50] for i in range(50)])
    picked = DD.pick_photos(np.random.default_rng(0), 50, 8, table, cfg)
    assert len(picked) == 8 and len(set(picked)) == 8
    assert set(picked[1:4]) <= set(table[picked[0]])  # a look-alike group comes first
    assert sorted(DD.pick_photos(np.random.default_rng(0), 5, 8, table[:5] % 5, cfg)) == [0, 1, 2, 3, 4]


def test_intensity_cap_ramps_then_stays():
    cfg = TrainDescriptorConfig(max_steps=100, ramp_fraction=0.5, intensity_start=0.2, intensity_end=1.0)
    assert DD.intensity_cap(cfg, 0) == 0.2 and DD.intensity_cap(cfg, 25) == pytest.approx(0.6)
    assert DD.intensity_cap(cfg, 50) == DD.intensity_cap(cfg, 100) == 1.0


def test_cache_build_open_and_reuse(train_photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(train_photos.glob("*.jpg"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg, items = small_config(), items_of(folder)
    built = DD.build_cache(items, cfg, tmp_path / "cache", progress=False)
    assert built.name == DD.cache_key(items, cfg) != DD.cache_key(items, small_config(seed=1))
    assert DD.cache_key(items, cfg) != DD.cache_key(items, small_config(edit_weights=["blur=3"]))
    cache = DD.open_cache(built)
    assert len(cache.ids) == 4 and "broken" not in cache.ids and cache.skipped[0][0].endswith("broken.jpg")
    assert cache.clean[0].shape == (40, 40, 3) and cache.views[0].shape == (2, 32, 32, 3)  # clean: 1.25 x size
    assert cache.intensity.shape == (4, 2) and (cache.intensity <= cfg.intensity_end).all()
    assert DD.build_cache(items, cfg, tmp_path / "cache", progress=False) == built  # reused, not rebuilt
    assert DD.open_cache(built).manifest_hash == cache.manifest_hash


def test_step_batches_depend_on_step_and_rank_only(train_photos, tmp_path):
    cfg = small_config()
    cache = DD.open_cache(DD.build_cache(items_of(train_photos), cfg, tmp_path / "cache", progress=False))
    table = nearest_neighbours(DD.thumbnail_vectors(cache), cfg.neighbours)
    assert table.shape == (12, 3)
    first = DD.StepBatches(cache, table, cfg, first=0, stop=3, rank=0)
    later = DD.StepBatches(cache, table, cfg, first=1, stop=3, rank=0)
    assert len(first) == 3 and first[1].shape == (8, 3, 32, 32)  # 4 clean views, then their 4 edited views
    assert torch.equal(first[1], later[0])
    assert not torch.equal(first[1], DD.StepBatches(cache, table, cfg, first=0, stop=3, rank=1)[1])
