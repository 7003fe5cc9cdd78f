"""The stage-1 descriptor's contrastive loss: symmetric InfoNCE over a batch of view pairs, optionally with a
cross-batch memory of recent embeddings as extra negatives (XBM, Wang et al. 2020).

    memory = CrossBatchMemory(size=4096, dim=256)
    loss, accuracy = info_nce(z, temperature, photos, memory)   # z: (2B, D) unit vectors, photos: (B,) ids
    memory.push(z, photos)                                      # after the step: the batch joins the memory

Why a memory: on a CPU the batch is small (64 photos), so every view sees only 126 negatives; the memory
adds thousands of recent (detached, slightly stale) ones at the cost of one (2B, M) matrix product. Entries of
the same photo as a row are masked out: an older view of the same photo is not a negative. Batch norm must be
frozen while the memory is on (`freeze_batch_norm`, done by the trainer): measured with batch statistics, it
wrecked the descriptor. Measured with frozen batch norm too (configs/descriptor_finetune.yaml says how), a
fine-tune of the shipped descriptor with a 4096-entry memory collapsed within 300 steps (every descriptor
within cosine 0.996 of every other; cause not found yet). The shipped descriptor was trained without a memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CrossBatchMemory:
    """A FIFO ring of the last `size` embeddings (M, D) float32 and the photo ids (M,) they came from."""

    def __init__(self, size: int, dim: int):
        if size < 0 or dim < 1:
            raise ValueError(f"memory size must be >= 0 and dim >= 1, got size {size}, dim {dim}")
        self.size, self.dim = int(size), int(dim)
        self.vectors = torch.zeros(self.size, self.dim)
        self.photos = torch.full((self.size,), -1, dtype=torch.long)  # -1: empty slot
        self.cursor = 0

    def __len__(self) -> int:
        return int((self.photos >= 0).sum())

    def push(self, z: torch.Tensor, photos: torch.Tensor) -> None:
        """Add the (2B, D) views of a batch whose photo ids are `photos` (B,) (clean views first, then edited)."""
        if self.size == 0:
            return
        z = z.detach().float().cpu()[-self.size:]
        ids = torch.cat([photos, photos]).long().cpu()[-self.size:]
        slots = (self.cursor + torch.arange(len(z))) % self.size
        self.vectors[slots], self.photos[slots] = z, ids
        self.cursor = int((self.cursor + len(z)) % self.size)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The occupied entries: (M', D) vectors and (M',) photo ids."""
        used = self.photos >= 0
        return self.vectors[used], self.photos[used]

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"vectors": self.vectors.clone(), "photos": self.photos.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["vectors"].shape) != (self.size, self.dim):
            raise ValueError(f"saved memory has shape {tuple(state['vectors'].shape)}, "
                             f"this run wants ({self.size}, {self.dim})")
        self.vectors, self.photos = state["vectors"].float().clone(), state["photos"].long().clone()
        self.cursor = int(state["cursor"])


def info_nce(z: torch.Tensor, temperature: torch.Tensor, photos: torch.Tensor | None = None,
             memory: CrossBatchMemory | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over (2B, D) unit vectors whose rows i and i+B are positives -> (loss, top-1 accuracy).

    With a `memory` (and the batch's photo ids `photos`, (B,)), its entries are extra negatives for every
    row, except entries of the row's own photo. Accuracy: the positive outscores every negative.
    """
    n = z.shape[0] // 2
    z32 = z.float()
    sim = (z32 @ z32.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    if memory is not None and photos is not None and len(memory):
        vectors, owners = memory.filled()
        extra = (z32 @ vectors.to(z.device).T) / temperature
        same = torch.cat([photos, photos]).to(z.device)[:, None] == owners.to(z.device)[None, :]
        sim = torch.cat([sim, extra.masked_fill(same, -math.inf)], dim=1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    accuracy = (sim.argmax(dim=1) == target).float().mean()
    return loss, accuracy


def freeze_batch_norm(model: nn.Module) -> None:
    """Batch-norm layers to eval mode (running statistics, still-trained affine weights), with a memory. Why:
    with batch statistics the batch's embeddings can share a batch signature that sets them apart from the
    memory's (positives are always in the batch, memory entries never) - the likely cause of what we measured
    with batch-norm training, lr 5e-4: dev recall@20 fell from 0.864 to 0.740 in 250 fine-tuning steps."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
