"""Train the stage-1 global descriptor (self-supervised, from scratch) on a folder of photos.

    python scripts/train_descriptor.py                                  # the demo photos, default settings
    python scripts/train_descriptor.py --train-dir /work/shared/data/train --max-steps 3000
    accelerate launch scripts/train_descriptor.py --train-dir ...       # under accelerate
    python scripts/train_descriptor.py --output-dir runs/descriptor --resume   # continue a run

See `pair_vit/descriptor/train.py` for the method and every option (`--help`).
"""
from pair_vit import cli
from pair_vit.descriptor.train import TrainDescriptorConfig, run

if __name__ == "__main__":
    cli.main(TrainDescriptorConfig, run)
