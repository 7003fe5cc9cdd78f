"""Train the stage-2 pair ViT (reference | query side by side -> "is a copy" logit) on a folder of photos.

    accelerate launch scripts/train_pairs.py                               # the demo photos, default settings
    accelerate launch scripts/train_pairs.py --train-dir /work/shared/data/train --output-dir runs/pairs \
        --max-steps 3000 [--config pairs.yaml]
    accelerate launch scripts/train_pairs.py --output-dir runs/pairs --resume  # continue a run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train_pairs.py ...  # 2 CPU processes

Plain `python scripts/train_pairs.py ...` runs one process too. See `pair_vit/pair/train.py` for the method and
every option (`--help`).
"""
from pair_vit import cli
from pair_vit.pair import train as pair_train

if __name__ == "__main__":
    cli.main(pair_train.TrainPairsConfig, pair_train.run)
