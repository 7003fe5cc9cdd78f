"""What the two trainers (`pair_vit.descriptor.train`, `pair_vit.pair.train`) share: one base config, one
accelerate loop, resumable checkpoints.

    @dataclass
    class MyConfig(TrainConfig): ...                    # the shared options, plus the trainer's own
    class MyTrainer(Trainer):                           # batches(), loss(batch) and what a checkpoint keeps
        ...
    trainer = MyTrainer(cfg, start_accelerator(), model, optimizer, scheduler)
    trainer.restore(ckpt)                               # a resumed run: weights, optimiser, schedule, RNG
    trainer.loop(stop)                                  # steps, metrics.csv, evaluation, checkpoints
    table = nearest_neighbours(vectors, k)              # (N, k) look-alike photos of each photo, hard negatives

Checkpoints hold RNG states as tensors and plain values only (they load with `weights_only=True`).
"""
from pair_vit.training.loop import RESUME_KEYS, TrainConfig, Trainer
from pair_vit.training.state import (append_metrics, broadcast, checkpoint_to_resume, config_diffs, init_from,
                                     make_scheduler, nearest_neighbours, prepare_output, refuse_resume, restore, rng_states,
                                     set_rng_states, set_torch_threads, start_accelerator, warmup_cosine)

__all__ = ["TrainConfig", "Trainer", "RESUME_KEYS", "append_metrics", "broadcast", "checkpoint_to_resume",
           "config_diffs", "init_from", "make_scheduler", "nearest_neighbours", "prepare_output", "refuse_resume",
           "restore", "rng_states", "set_rng_states", "set_torch_threads", "start_accelerator", "warmup_cosine"]
