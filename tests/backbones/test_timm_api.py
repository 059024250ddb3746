"""timm's model API on every registered model, and one-line errors for bad input."""
import copy

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2

import mbbackbones

NAMES = mbbackbones.list_models()


@pytest.mark.parametrize("name", NAMES)
def test_classification_api(name):
    model = timm.create_model(name, num_classes=7, drop_rate=0.1).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        logits = model(x)
    assert logits.shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] in ("bilinear", "bicubic")
    assert 0 < cfg["crop_pct"] <= 1 and len(cfg["mean"]) == len(cfg["std"]) == 3
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224)
    has_weights = bool(mbbackbones.ENTRIES[name].weights)
    assert (name in timm.list_models(pretrained=True, include_tags=False)) == has_weights


def test_torchvision_weights_cfg():
    cfg = timm.create_model("mbv3_large").pretrained_cfg
    assert cfg["url"].endswith("mobilenet_v3_large-5c1a4163.pth") and cfg["crop_pct"] == round(224 / 232, 4)
    legacy = timm.create_model("mbv3_large.tv_in1k").pretrained_cfg
    assert legacy["url"].endswith("mobilenet_v3_large-8738ca79.pth") and legacy["crop_pct"] == 0.875


def test_features_only_out_indices_and_in_chans():
    model = timm.create_model("mbv3_large", features_only=True, out_indices=(1, 3), in_chans=1).eval()
    assert model.feature_info.channels() == [24, 112]
    outputs = model(torch.randn(1, 1, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs] == [(24, 16, 16), (112, 4, 4)]
    last_two = timm.create_model("mbv3_small", features_only=True, out_indices=2)
    assert last_two.feature_info.channels() == [48, 576]


def test_pruned_features_match_full_model():
    full = timm.create_model("mbv2_100", features_only=True, feature_location="expansion").eval()
    pruned = timm.create_model("mbv2_100", features_only=True, feature_location="expansion", out_indices=(0, 3))
    pruned.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = full(x), pruned.eval()(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[1])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in full.parameters())


def test_forward_intermediates_returns_final_map():
    model = timm.create_model("mbv3_small").eval()
    x = torch.randn(1, 3, 64, 64)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == 5 and torch.equal(final, intermediates[-1])
    assert torch.allclose(final, model.forward_features(x))


def test_builds_on_meta_device():
    """segmentation-models-pytorch reads feature_info from a model built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model("mbv3_large_reduced", features_only=True, output_stride=16)
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]


def test_training_conveniences():
    assert create_optimizer_v2(timm.create_model("mbv3_large", drop_path_rate=0.1), "sgd", lr=0.1, layer_decay=0.9)
    plain = timm.create_model("mbv3_small", drop_rate=0.0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, checkpointed):
        model.train()(x).square().sum().backward()
    assert torch.allclose(plain.stem.conv.weight.grad, checkpointed.stem.conv.weight.grad, rtol=1e-4, atol=1e-6)


def test_drop_rate_defaults():
    assert timm.create_model("mbv3_large").head_drop.p == 0.2
    assert timm.create_model("mbv3_large", drop_rate=0.0).head_drop.p == 0.0


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'mbv3_large'.*Available: mbv3_large, mbv3_large_reduced"):
        mbbackbones.create_model("mbv3_larg")
    assert isinstance(mbbackbones.create_model("mbv3_small"), mbbackbones.MobileNet)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(output_stride=4), r"output_stride=4 is not supported; choose one of 8, 16, 32"),
    (dict(feature_location="depthwise"), r"feature_location='depthwise' is not supported; choose one of 'block'"),
    (dict(features_only=True, out_indices=(0, 5)), r"out_indices=\(0, 5\) is out of range: valid indices are 0..4"),
    (dict(features_only=True, out_indices=6), r"out_indices=6 is out of range"),
    (dict(reduce_tail=True), r"mbv3_large: unknown argument\(s\) reduce_tail; valid: .*reduced_tail"),
])
def test_bad_arguments_get_one_line_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        timm.create_model("mbv3_large", **kwargs)
    assert "\n" not in str(error.value)
