"""The tables and their sizing against the paper, torchvision and timm."""
import pytest
import timm
import torch
from torchvision.models import mobilenetv3 as tv_v3

import mbbackbones
from mbbackbones.architectures import ARCHS, V3_LARGE, V3_SMALL, resolve
from mbbackbones.model import FEATURE_LOCATIONS
from mbbackbones.profile import count_madds, count_params

# paper / torchvision numbers (shared/ANCHORS.md): params with 1000 classes, MAdds at 224 (millions)
ANCHORS = {
    "mbv3_large": (5_483_032, 216.6), "mbv3_large_reduced": (2_569_352, None), "mbv3_large_075": (3_993_528, 154.6),
    "mbv3_small": (2_542_856, 56.5), "mbv3_small_reduced": (1_099_672, None), "mbv3_small_075": (2_041_872, 43.4),
    "mbv2_100": (3_504_872, 300.8), "mbv2_050": (1_968_680, 97.1), "mbv2_035": (1_677_128, 59.3),
    "mbv1_100": (4_231_976, 568.7), "mbv1_050": (1_331_592, 149.5),
    # timm's mobilenetv4_* builds, measured as here
    "mbv4_conv_small": (3_774_024, 186.0), "mbv4_conv_medium": (9_715_512, 827.6),
    "mbv4_conv_large": (32_590_864, 2171.3), "mbv4_hybrid_medium": (11_074_648, 941.7),
    "mbv4_hybrid_large": (37_764_624, 2510.2),
}
CHANNELS = {  # feature_location "block", "downsample", "expansion"
    "mbv3_large": ([16, 24, 40, 112, 960], [16, 24, 40, 80, 960], [64, 72, 240, 672, 960]),
    "mbv3_large_reduced": ([16, 24, 40, 112, 480], [16, 24, 40, 80, 480], [64, 72, 240, 672, 480]),
    "mbv3_small": ([16, 16, 24, 48, 576], [16, 16, 24, 40, 576], [16, 72, 96, 288, 576]),
    "mbv3_small_reduced": ([16, 16, 24, 48, 288], [16, 16, 24, 40, 288], [16, 72, 96, 288, 288]),
    "mbv2_100": ([16, 24, 32, 96, 1280], [32, 24, 32, 64, 1280], [96, 144, 192, 576, 1280]),
    "mbv1_100": ([64, 128, 256, 512, 1024], [32, 128, 256, 512, 1024], [64, 128, 256, 512, 1024]),
    # 'block' as timm's features_only; 'expansion' reads the input where a conv or fused IB strides
    "mbv4_conv_small": ([32, 32, 64, 96, 960], [32, 32, 96, 96, 960], [32, 32, 192, 576, 960]),
    "mbv4_conv_medium": ([32, 48, 80, 160, 960], [32, 48, 80, 160, 960], [32, 192, 480, 960, 960]),
    "mbv4_conv_large": ([24, 48, 96, 192, 960], [24, 48, 96, 192, 960], [24, 192, 384, 768, 960]),
    "mbv4_hybrid_medium": ([32, 48, 80, 160, 960], [32, 48, 80, 160, 960], [32, 192, 480, 960, 960]),
    "mbv4_hybrid_large": ([24, 48, 96, 192, 960], [24, 48, 96, 192, 960], [24, 192, 384, 768, 960]),
}


def test_registry_is_complete():
    assert mbbackbones.list_models() == [
        "mbv3_large", "mbv3_large_reduced", "mbv3_large_075", "mbv3_small", "mbv3_small_reduced", "mbv3_small_075",
        "mbv2_100", "mbv2_050", "mbv2_035", "mbv1_100", "mbv1_050",
        "mbv4_conv_small", "mbv4_conv_medium", "mbv4_conv_large", "mbv4_hybrid_medium", "mbv4_hybrid_large"]
    assert set(mbbackbones.list_models()) <= set(timm.list_models("mbv*"))


@pytest.mark.parametrize("name", mbbackbones.list_models())
def test_params_and_madds_match_references_and_metadata(name):
    model = timm.create_model(name)
    params, madds = ANCHORS[name]
    entry = mbbackbones.ENTRIES[name]
    measured = count_madds(model.eval(), torch.zeros(1, 3, 224, 224)) / 1e6
    assert count_params(model) == params == entry.params
    assert round(measured, 1) == entry.madds_m
    if madds is not None:
        assert round(measured, 1) == madds


@pytest.mark.parametrize(("torchvision_name", "rows"), [("mobilenet_v3_large", V3_LARGE),
                                                         ("mobilenet_v3_small", V3_SMALL)])
@pytest.mark.parametrize("reduced_tail", [False, True])
@pytest.mark.parametrize("dilated", [False, True])
def test_resolved_blocks_match_torchvision_config(torchvision_name, rows, reduced_tail, dilated):
    reference, _ = tv_v3._mobilenet_v3_conf(torchvision_name, reduced_tail=reduced_tail, dilated=dilated)
    arch = ARCHS["v3_large" if rows is V3_LARGE else "v3_small"]
    blocks = resolve(arch, reduced_tail=reduced_tail, output_stride=16 if dilated else 32).blocks
    assert len(blocks) == len(reference)
    for ours, theirs in zip(blocks, reference):
        assert (ours.in_channels, ours.kernel, ours.expansion_channels, ours.out_channels, bool(ours.se_channels),
                ours.act == "hswish", ours.dilation) == (
            theirs.input_channels, theirs.kernel, theirs.expanded_channels, theirs.out_channels, theirs.use_se,
            theirs.use_hs, theirs.dilation)
        assert ours.stride == (1 if theirs.dilation > 1 else theirs.stride)


def test_se_squeeze_channels_follow_make_divisible():
    for block in resolve(ARCHS["v3_large"]).blocks:
        if block.se_channels:
            assert block.se_channels == timm.layers.make_divisible(block.expansion_channels / 4, 8)


@pytest.mark.parametrize("name", CHANNELS)
@pytest.mark.parametrize("location", FEATURE_LOCATIONS)
def test_feature_channels_and_shapes(name, location):
    model = timm.create_model(name, features_only=True, feature_location=location).eval()
    expected = CHANNELS[name][FEATURE_LOCATIONS.index(location)]
    assert model.feature_info.channels() == expected
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 128, 160))
    strides = [2, 4, 8, 16, 32]
    assert [tuple(f.shape[1:]) for f in features] == [(c, 128 // s, 160 // s) for c, s in zip(expected, strides)]


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name", ["mbv3_large_reduced", "mbv3_small", "mbv2_100", "mbv1_100", "mbv4_conv_small",
                                  "mbv4_hybrid_medium"])
@pytest.mark.parametrize("location", FEATURE_LOCATIONS)
def test_output_stride_dilates(name, output_stride, location):
    model = timm.create_model(name, features_only=True, output_stride=output_stride, feature_location=location)
    strides = [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    assert model.feature_info.reduction() == strides
    features = model.eval()(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features] == strides
    full = timm.create_model(name, features_only=True, feature_location=location)
    assert model.feature_info.channels() == full.feature_info.channels()
    assert count_params(model) == count_params(full)


def test_reduced_tail_halves_only_the_last_stage():
    full, reduced = resolve(ARCHS["v3_large"]), resolve(ARCHS["v3_large"], reduced_tail=True)
    assert full.blocks[:12] == reduced.blocks[:12]
    assert [(b.expansion_channels, b.out_channels) for b in reduced.blocks[12:]] == [(672, 80), (480, 80), (480, 80)]
    assert (reduced.last_conv, reduced.head_hidden) == (480, 640)


@pytest.mark.parametrize(("arch", "timm_name"), [("v3_large", "mobilenetv3_large_075"),
                                                  ("v3_small", "mobilenetv3_small_075")])
def test_width_keeps_the_paper_expansion_ratios(arch, timm_name):
    """Width 0.75 scales expansions by ratio to the block input, as the paper (and timm) do."""
    reference = [block.conv_dw.in_channels for stage in timm.create_model(timm_name).blocks for block in stage
                 if hasattr(block, "conv_dw")]
    assert [b.expansion_channels for b in resolve(ARCHS[arch], width=0.75).blocks] == reference
