"""The processes of a run: one, or those started by `accelerate launch` (any number, CPU or GPU).

`Processes` splits a list of work items between them and gathers their results in process order, so a
stage run under `accelerate launch` produces exactly what a single process produces.
"""
from __future__ import annotations

import os
from pathlib import Path


class Processes:
    """One process, or the processes of an `accelerate launch`: split work, gather results."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it): without cpu=True a
            # CPU-only launch silently runs every process alone on all the work.
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or \
                not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            if self.state.num_processes != int(os.environ["WORLD_SIZE"]):
                raise RuntimeError(f"accelerate started {self.state.num_processes} process(es), "
                                   f"WORLD_SIZE={os.environ['WORLD_SIZE']}")
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    @property
    def device(self):
        import torch

        return self.state.device if self.state else torch.device("cpu")

    def share(self, images: dict[str, Path]) -> dict[str, Path]:
        """This process's contiguous share of `images` (all of them in a single process)."""
        if self.state is None or not images:
            return images
        with self.state.split_between_processes(list(images.items())) as mine:
            return dict(mine)

    def gather(self, items: list) -> list:
        """Concatenate every process's list, in process order (the input list in a single process)."""
        if self.state is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on (no-op in a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

