"""MobileNetV4 as tables: the taps, blocks, published weights and dilation that timm's own build does not check."""
from pathlib import Path

import huggingface_hub.constants
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import randomize_batchnorm
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.models._efficientnet_blocks import UniversalInvertedResidual

import mbbackbones
from mbbackbones import convert
from mbbackbones.architectures import BlockSpec
from mbbackbones.checkpoint import WeightsUnavailable
from mbbackbones.layers import MobileMQA, UniversalInvertedBottleneck

VARIANTS = ("conv_small", "conv_medium", "conv_large", "hybrid_medium", "hybrid_large")
CFG_KEYS = ("hf_hub_id", "num_classes", "input_size", "pool_size", "crop_pct", "test_input_size", "test_crop_pct",
            "interpolation", "mean", "std")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache; ``put(repo_id, state_dict)`` stores a snapshot where offline loads find it."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, state_dict: dict) -> Path:
        repo, commit = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        save_file(state_dict, repo / "snapshots" / commit / "model.safetensors")
        return cache

    return put


def twins(variant: str, **kwargs):
    """timm's model with random weights and BN statistics, and ours with its weights."""
    reference = randomize_batchnorm(timm.create_model(f"mobilenetv4_{variant}"))
    model = timm.create_model(f"mbv4_{variant}", **kwargs).eval()
    model.load_state_dict(convert(reference.state_dict(), model))
    return model, reference


@pytest.mark.parametrize("variant", VARIANTS)
def test_expansion_taps_read_timms_expanded_features(variant):
    """C1..C4 at 'expansion': the 1x1 expansion's output (timm's UIB ``pw_exp``) of the first block at the next
    stride; where that block is a conv or fused IB (the expansion is the strided conv), its input."""
    model, reference = twins(variant, feature_location="expansion")
    expected = []
    for stage in reference.blocks[:4]:
        first = stage[0]
        if isinstance(first, UniversalInvertedResidual):
            first.pw_exp.register_forward_hook(lambda module, args, out: expected.append(out))
        else:
            first.register_forward_pre_hook(lambda module, args: expected.append(args[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference(x)
        features = model.forward_intermediates(x, intermediates_only=True)
    assert [info["num_chs"] for info in model.feature_info[:4]] == [e.shape[1] for e in expected]
    for ours, theirs in zip(features[:4], expected, strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max())


def test_published_weights_load_from_the_hub_cache(hf_cache):
    reference = randomize_batchnorm(timm.create_model("mobilenetv4_conv_small"))
    cache = hf_cache("timm/mobilenetv4_conv_small.e2400_r224_in1k", reference.state_dict())
    model = timm.create_model("mbv4_conv_small", pretrained=True).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference(x)
        assert (model(x) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())
    missing = r"mbv4_conv_small: weights timm/mobilenetv4_conv_small.e1200_r224_in1k \(Hugging Face Hub\) are not in "
    with pytest.raises(WeightsUnavailable, match=rf"{missing}{cache} .*pretrained_cfg_overlay"):
        timm.create_model("mbv4_conv_small.e1200_r224_in1k", pretrained=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrained_cfgs_are_timms(variant):
    """Each tag: timm's hub file, input size, crop and normalisation; the default tag is timm's default."""
    entry = mbbackbones.ENTRIES[f"mbv4_{variant}"]
    assert get_pretrained_cfg(f"mobilenetv4_{variant}").hf_hub_id == next(iter(entry.weights.values()))["hf_hub_id"]
    for tag, cfg in entry.weights.items():
        theirs = get_pretrained_cfg(f"mobilenetv4_{variant}.{tag}").to_dict()
        assert {k: cfg.get(k) for k in CFG_KEYS} == {k: theirs.get(k) for k in CFG_KEYS}, tag


def spec(start: int, middle: int, stride: int, **kwargs) -> BlockSpec:
    columns = dict(in_channels=16, expansion_channels=32, out_channels=16, kernel=middle, stride=stride, dilation=1,
                   se_channels=0, act="relu", reduction=4, block="uib", start_kernel=start)
    return BlockSpec(**{**columns, **kwargs})


@pytest.mark.parametrize(("start", "middle", "strided"), [(3, 5, "depthwise"), (0, 3, "depthwise"),
                                                          (5, 0, "expand.start"), (0, 0, None)])
def test_uib_kernels_pick_the_paper_variants(start, middle, strided):
    """ExtraDW, IB, ConvNext, FFN: the middle depthwise strides, else the start one; stride 1 keeps the residual."""
    stride = 2 if strided else 1
    block = UniversalInvertedBottleneck(spec(start, middle, stride)).eval()
    convs = {name.removesuffix(".conv"): m for name, m in block.named_modules() if isinstance(m, torch.nn.Conv2d)}
    expected = ["expand", "project"] + ["expand.start"] * bool(start) + ["depthwise"] * bool(middle)
    assert sorted(convs) == sorted(expected)
    assert [name for name, conv in convs.items() if conv.stride == (2, 2)] == ([strided] if strided else [])
    assert block.has_residual == (not strided)
    assert block(torch.randn(1, 16, 8, 8)).shape == (1, 16, 8 // stride, 8 // stride)


@pytest.mark.parametrize(("output_stride", "dilations"), [(32, (1, 1)), (16, (1, 2)), (8, (2, 4))])
def test_hybrid_attention_under_dilation(output_stride, dilations):
    """The stride-16 stage's Mobile MQA down-samples keys and values by a strided 3x3 depthwise conv: dilated as
    the stage's other depthwise convs, keeping its stride (keys and values on a grid twice as dense at output
    stride 8). The stride-32 stage's attends to all positions: dilation leaves it unchanged."""
    model = timm.create_model("mbv4_hybrid_medium", output_stride=output_stride).eval()
    attention = {16: [], 32: []}
    for block, reduction in zip(model.blocks, model._block_reductions):
        if isinstance(block, MobileMQA):
            attention[reduction].append(block.attn)
    assert len(attention[16]) == len(attention[32]) == 4
    for attn in attention[16]:
        assert attn.key.down_conv.stride == attn.value.down_conv.stride == (2, 2)
        assert attn.key.down_conv.dilation == attn.value.down_conv.dilation == (dilations[0],) * 2
    assert not any(hasattr(attn.key, "down_conv") for attn in attention[32])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-1] for f in features] == [64 // min(s, output_stride) for s in (2, 4, 8, 16, 32)]


def test_smp_encoders():
    """segmentation-models-pytorch's ``tu-`` encoders (built on the meta device first), dilated as well."""
    for model in (smp.Unet("tu-mbv4_conv_small", encoder_weights=None, classes=3),
                  smp.DeepLabV3Plus("tu-mbv4_hybrid_medium", encoder_weights=None, encoder_output_stride=16)):
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 64, 64)).shape[-2:] == (64, 64)
