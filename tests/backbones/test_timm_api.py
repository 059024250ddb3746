"""timm's model API on every registered model, checked against timm's own MobileNets, and one-line errors."""
import copy

import pytest
import timm
import torch
from conftest import randomize_batchnorm
from timm.data import resolve_data_config
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

import mbbackbones
from mbbackbones import convert

NAMES = mbbackbones.list_models()
# ours, timm's own model of the same architecture, our arguments for timm's weights
TIMM_TWINS = [("mbv3_large", "mobilenetv3_large_100", dict(norm_eps=1e-5)),
              ("mbv2_100", "mobilenetv2_100", {}),
              ("mbv1_100", "mobilenetv1_100", {}),
              ("mbv4_conv_small", "mobilenetv4_conv_small", {}),
              ("mbv4_hybrid_medium", "mobilenetv4_hybrid_medium", {})]
IMAGE = torch.randn(2, 3, 128, 128)


def twins(name, timm_name, kwargs):
    """Our model and timm's, with the same (timm's) weights and non-trivial BatchNorm statistics."""
    reference = randomize_batchnorm(timm.create_model(timm_name))
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(convert(reference.state_dict(), model))
    return model, reference


def assert_close(ours, theirs):
    """Within 1e-4, or 1e-4 of the scale of larger maps (random V4 convs with random BN statistics grow them)."""
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max())


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
    weights = mbbackbones.ENTRIES[name].weights
    size = next(iter(weights.values()))["input_size"] if weights else (3, 224, 224)  # the default weights' size
    assert cfg["input_size"] == size and cfg["interpolation"] in ("bilinear", "bicubic")
    assert 0 < cfg["crop_pct"] <= 1 and len(cfg["mean"]) == len(cfg["std"]) == 3
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == size
    has_weights = bool(weights)
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


@pytest.mark.parametrize(("name", "timm_name", "kwargs"), TIMM_TWINS)
def test_unpooled_head_matches_timm(name, timm_name, kwargs):
    """global_pool='': timm's maps before pooling, its 1x1 head conv applied at every position ([B, 1280, H, W])."""
    model, reference = twins(name, timm_name, kwargs)
    with torch.no_grad():
        features = reference.forward_features(IMAGE)
        for net in (model, reference):
            net.reset_classifier(0, "")
        expected = reference(IMAGE)
        assert expected.dim() == 4
        assert_close(model(IMAGE), expected)
        assert_close(model.forward_head(features, pre_logits=True), expected)
    unpooled = timm.create_model(name, global_pool="", num_classes=0, **kwargs).eval()
    unpooled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(unpooled(IMAGE), expected)


@pytest.mark.parametrize("name", ["mbv3_small", "mbv2_050", "mbv1_050"])
def test_unpooled_classifier_gives_logits_at_every_position(name):
    """With classes and global_pool='', the head acts per position: on a 1x1 map those are the pooled logits."""
    model = timm.create_model(name, num_classes=5).eval()
    unpooled = timm.create_model(name, num_classes=5, global_pool="").eval()
    unpooled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert unpooled(IMAGE).shape == (2, 5, 4, 4)
        small = torch.randn(2, 3, 32, 32)  # a 1x1 final map
        assert torch.allclose(unpooled(small).flatten(1), model(small), atol=1e-5)


def test_reset_classifier_switches_the_head_layout_and_keeps_its_weights():
    """Pooled -> unpooled -> pooled: the hidden layer is the same parameters, per position or on [B, C]."""
    model = timm.create_model("mbv3_small", num_classes=5).eval()
    hidden, bias = model.head_fc.weight, model.head_fc.bias
    with torch.no_grad():
        features = model.forward_features(IMAGE)
        expected = model.forward_head(features, pre_logits=True)
        model.reset_classifier(0, "")
        assert model.head_fc.weight is hidden
        per_position = torch.nn.functional.linear(features.movedim(1, -1), hidden, bias)  # on the last dim
        assert_close(model(IMAGE), torch.nn.functional.hardswish(per_position).movedim(-1, 1))
        model.reset_classifier(0, "avg")
        assert model.head_fc.weight is hidden
        assert torch.equal(model(IMAGE), expected)


@pytest.mark.parametrize(("name", "timm_name", "kwargs"), TIMM_TWINS)
def test_pruned_model_forward_matches_timm(name, timm_name, kwargs):
    model, reference = twins(name, timm_name, kwargs)
    assert model.prune_intermediate_layers([1, 3]) == reference.prune_intermediate_layers([1, 3]) == [1, 3]
    with torch.no_grad():
        assert_close(model(IMAGE), reference(IMAGE))  # the C4 map, unpooled
    assert model.num_features == reference.num_features


@pytest.mark.parametrize(("name", "timm_name", "kwargs"), TIMM_TWINS)
@pytest.mark.parametrize("indices", [[1, 3], [-2, 0], [0, 1, 2, 3]])
def test_forward_intermediates_match_timm(name, timm_name, kwargs, indices):
    """The final map is forward_features' (960 channels on V3-Large), whichever taps are taken; the taps come in
    network order. (C1..C4 only: timm's V2 C5 is its last block, 320 channels; ours the last conv, as torchvision.)"""
    model, reference = twins(name, timm_name, kwargs)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(IMAGE, indices=indices)
        expected_final, expected = reference.forward_intermediates(IMAGE, indices=indices)
        assert_close(final, expected_final)
        assert_close(final, reference.forward_features(IMAGE))
        for ours, theirs in zip(intermediates, expected, strict=True):
            assert_close(ours, theirs)
        early = model.forward_intermediates(IMAGE, indices=indices, stop_early=True, intermediates_only=True)
        for ours, theirs in zip(early, expected, strict=True):
            assert_close(ours, theirs)


@pytest.mark.parametrize("location", ["block", "expansion"])
def test_stop_early_skips_the_layers_after_the_last_tap(location):
    model = timm.create_model("mbv3_small", feature_location=location).eval()
    called = []
    for module in (model.blocks[-1], model.last_conv):
        module.register_forward_hook(lambda *_: called.append(True))
    with torch.no_grad():
        full = model.forward_intermediates(IMAGE, indices=[0, 2], intermediates_only=True)
        assert called
        called.clear()
        early = model.forward_intermediates(IMAGE, indices=[0, 2], intermediates_only=True, stop_early=True)
    assert not called
    assert all(torch.equal(a, b) for a, b in zip(early, full, strict=True))


def test_gradient_checkpointing_applies_to_features_only_models():
    """timm's forward_intermediates checkpoints each block: the forward runs again during the backward."""
    model = timm.create_model("mbv3_small", features_only=True).train()
    calls = []
    model.model.blocks[5].register_forward_pre_hook(lambda *_: calls.append(True))
    x = torch.randn(2, 3, 64, 64)
    expected = torch.autograd.grad(sum(f.sum() for f in model(x)), model.model.stem.conv.weight)[0]
    assert len(calls) == 1
    model.model.set_grad_checkpointing()
    actual = torch.autograd.grad(sum(f.sum() for f in model(x)), model.model.stem.conv.weight)[0]
    assert len(calls) == 3
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(output_fmt="NHWC"),
    dict(stop_early=True),
    dict(indices=[0, 5]),
    dict(indices=6),
    dict(indices=0),
    dict(indices=[]),
], ids=["output_fmt", "stop_early", "index", "last_n", "last_0", "empty"])
def test_forward_intermediates_misuse_fails_as_timm(kwargs):
    """The exception types of timm's own model, with one line that names the valid values."""
    with pytest.raises(Exception) as expected:
        timm.create_model("mobilenetv3_large_100").forward_intermediates(IMAGE, **kwargs)
    with pytest.raises(expected.type) as error:
        timm.create_model("mbv3_large").forward_intermediates(IMAGE, **kwargs)
    assert "\n" not in str(error.value) and str(error.value)
    if "indices" in kwargs:
        assert "valid indices are 0..4 (C1..C5, strides 2, 4, 8, 16, 32)" in str(error.value)


@pytest.mark.parametrize(("name", "timm_name", "kwargs"), TIMM_TWINS)
def test_other_poolings_size_the_head_as_timm(name, timm_name, kwargs):
    model = timm.create_model(name, global_pool="catavgmax", **kwargs).eval()
    reference = timm.create_model(timm_name, global_pool="catavgmax")
    assert model.head_hidden_size == reference.head_hidden_size
    assert model(IMAGE).shape == (2, 1000)
    if name.startswith(("mbv3", "mbv4")):  # a hidden layer after the pooling
        assert model.head_fc.in_features == reference.conv_head.in_channels == 2 * 960
        with pytest.raises(AssertionError):
            reference.reset_classifier(10, "avg")
        with pytest.raises(AssertionError, match="global_pool='avg' gives 960 channels, but the head's hidden layer "
                                                 "takes 1920") as error:
            model.reset_classifier(10, "avg")
        assert "\n" not in str(error.value)
    else:
        model.reset_classifier(10, "avg")
        assert model(IMAGE).shape == (2, 10)


def test_feature_location_accepts_timms_bottleneck():
    ours = timm.create_model("mbv3_large", features_only=True, feature_location="bottleneck")
    theirs = timm.create_model("mobilenetv3_large_100", features_only=True, feature_location="bottleneck")
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [16, 24, 40, 112, 960]
    assert ours.feature_info.module_name() == timm.create_model(
        "mbv3_large", features_only=True, feature_location="block").feature_info.module_name()


def test_timm_batchnorm_spelling():
    """bn_eps / bn_momentum, as timm's MobileNet builders read them, set every BatchNorm."""
    model = timm.create_model("mbv3_small", bn_eps=1e-5, bn_momentum=0.2)
    reference = timm.create_model("mobilenetv3_small_100", bn_eps=1e-5, bn_momentum=0.2)
    for net in (model, reference):
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert {(m.eps, m.momentum) for m in norms} == {(1e-5, 0.2)}
    with pytest.raises(TypeError, match="mbv3_small: bn_eps is timm's spelling of norm_eps; pass only norm_eps"):
        timm.create_model("mbv3_small", bn_eps=1e-5, norm_eps=1e-3)


def test_drop_path_rate_reaches_the_residual_blocks():
    model = timm.create_model("mbv2_100", drop_path_rate=0.2)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert model.blocks[1].drop_path.drop_prob == pytest.approx(0.2 / 16)
    with pytest.raises(ValueError, match="drop_path_rate=0.1 has no effect on MobileNetV1: its blocks have no "
                                         "residual branch") as error:
        timm.create_model("mbv1_100", drop_path_rate=0.1)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["mbv3_large", "mbv2_100", "mbv1_100"])
def test_group_matcher_coarse_groups_blocks_by_stride(name):
    model = timm.create_model(name)
    fine = group_parameters(model, model.group_matcher(coarse=False))
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    # stem, each block (coarse: each stride, 2 to 32), head; the last conv joins the last group, as timm's conv_head
    assert len(fine) == 1 + len(model.blocks) + 1
    assert len(coarse) == 1 + 5 + 1
    for names in coarse.values():
        blocks = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
        assert len({model._block_reductions[i] for i in blocks}) <= 1


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
    (dict(features_only=True, out_indices=()), r"out_indices=\(\) selects no feature map: valid indices are 0..4"),
    (dict(reduce_tail=True), r"mbv3_large: unknown argument\(s\) reduce_tail; valid: .*reduced_tail"),
    (dict(kwargs={}), r"mbv3_large: unknown argument\(s\) kwargs;"),
])
def test_bad_arguments_get_one_line_errors(kwargs, message):
    """The exception type timm raises for the same mistake (feature_take_indices: AssertionError, ValueError)."""
    with pytest.raises((ValueError, TypeError, AssertionError), match=message) as error:
        timm.create_model("mbv3_large", **kwargs)
    assert "\n" not in str(error.value)
    if "out_indices" in kwargs:
        with pytest.raises(Exception) as theirs:
            timm.create_model("mobilenetv3_large_100", features_only=True, feature_cls="getter",
                              out_indices=kwargs["out_indices"])
        assert isinstance(error.value, theirs.type)  # timm's type, or a subclass of it
