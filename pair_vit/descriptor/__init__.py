"""Stage 1: the global descriptor that shortlists candidate references.

    model    Descriptor (timm CNN + GeM + projection), build/load, `embed`, preprocessing, the shipped weights
    views    multi-view embedding of image folders (query and reference views), `embed_folder`
    regions  rectangle proposals (collage cells, pasted photos) for the "regions" query views
    config   TrainDescriptorConfig (what `scripts/train_descriptor.py` parses)
    data     training data: the edited-view cache, look-alike batches, mining
    loss     InfoNCE and the cross-batch memory
    train    the training run (`run(cfg)`), on the shared loop of `pair_vit.training`
"""
from pair_vit.descriptor.model import (IMAGENET_MEAN, IMAGENET_STD, SHIPPED_WEIGHTS, Descriptor,
                                       DescriptorModelConfig, build_descriptor, embed, load_descriptor, preprocess)

__all__ = ["Descriptor", "DescriptorModelConfig", "build_descriptor", "load_descriptor", "embed", "preprocess",
           "IMAGENET_MEAN", "IMAGENET_STD", "SHIPPED_WEIGHTS"]
