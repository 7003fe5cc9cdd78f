"""InfoNCE and the cross-batch memory of the descriptor trainer, on hand-checked cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from pair_vit.descriptor.loss import CrossBatchMemory, freeze_batch_norm, info_nce


def test_info_nce_perfect_and_random():
    z = F.normalize(torch.randn(8, 16), dim=1)
    loss, acc = info_nce(torch.cat([z, z]), torch.tensor(0.05))
    assert acc == 1.0 and loss < 0.5
    loss_random, _ = info_nce(F.normalize(torch.randn(16, 16), dim=1), torch.tensor(0.05))
    assert loss_random > loss


def test_info_nce_hand_computed_with_memory():
    """Two photos on orthogonal axes; the memory holds one vector equal to photo 0's direction."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e0, e1, e0, e1])  # clean 0, clean 1, edited 0, edited 1
    t = torch.tensor(1.0)
    plain, _ = info_nce(z, t)
    # each row: positive sim 1, the two other rows sim 0 -> -log(e / (e + 2))
    assert plain.item() == pytest.approx(-math.log(math.e / (math.e + 2)), abs=1e-5)

    memory = CrossBatchMemory(size=4, dim=2)
    memory.push(torch.stack([e0, e0]), torch.tensor([7]))  # photo 7 (not in the batch): a negative for all
    with_memory, _ = info_nce(z, t, torch.tensor([0, 1]), memory)
    # rows of photo 0 gain two negatives at sim 1, rows of photo 1 two at sim 0
    row0 = -math.log(math.e / (math.e + 2 + 2 * math.e))
    row1 = -math.log(math.e / (math.e + 2 + 2))
    assert with_memory.item() == pytest.approx((row0 + row1) / 2, abs=1e-5)

    same = CrossBatchMemory(size=4, dim=2)
    same.push(torch.stack([e0, e0]), torch.tensor([0]))  # an older view of photo 0: masked, not a negative
    masked, _ = info_nce(z, t, torch.tensor([0, 1]), same)
    row1 = -math.log(math.e / (math.e + 2 + 2))
    assert masked.item() == pytest.approx((-math.log(math.e / (math.e + 2)) + row1) / 2, abs=1e-5)


def test_memory_ring_and_state():
    memory = CrossBatchMemory(size=3, dim=2)
    assert len(memory) == 0
    memory.push(torch.ones(2, 2), torch.tensor([5]))
    memory.push(2 * torch.ones(2, 2), torch.tensor([6]))  # wraps: the oldest entry is overwritten
    vectors, photos = memory.filled()
    assert len(memory) == 3 and sorted(photos.tolist()) == [5, 6, 6]
    assert memory.cursor == 1 and vectors[0, 0] == 2
    copy = CrossBatchMemory(size=3, dim=2)
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.filled()[0], vectors) and copy.cursor == memory.cursor
    with pytest.raises(ValueError, match="shape"):
        CrossBatchMemory(size=5, dim=2).load_state_dict(memory.state_dict())
    CrossBatchMemory(size=0, dim=2).push(torch.ones(2, 2), torch.tensor([1]))  # size 0: off, no error


def test_freeze_batch_norm_keeps_running_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model.train()
    freeze_batch_norm(model)
    before = model[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, before) and model.training and not model[1].training
