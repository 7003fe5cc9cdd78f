"""Stage 2: the pair Vision Transformer that reads a reference and a query side by side.

    model      PairViT (stems, half marker, timm ViT), build/load/save, `score_pairs`, the shipped weights
    data       training groups of look-alike photos with shared edit chains
    train      the training run (`run(cfg)`), on the shared loop of `pair_vit.training`
    scoring    pair-scoring a shortlist (query views, decoded-image caches)
    localize   where the reference sits in the query: boxes from token correspondences, crops read at full resolution
    attention  attention rollout: where in the query the model found the reference
"""
from pair_vit.pair.model import SHIPPED_WEIGHTS, PairViT, build_pair_model, default_model_args, load_pair_model, score_pairs

__all__ = ["PairViT", "build_pair_model", "default_model_args", "load_pair_model", "score_pairs", "SHIPPED_WEIGHTS"]
