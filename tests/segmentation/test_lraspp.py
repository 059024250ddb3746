"""LR-ASPP segmentation: torchvision parity, sizes, pooling modes, export; smp on our encoders."""
import numpy as np
import onnxruntime
import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import randomize_batchnorm
from torch import nn
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import heads
from heads.segmentation.lraspp import LargeKernelAvgPool, PoolingGate
from mbbackbones.profile import count_madds, count_params

NAMES = heads.list_models("segmentation")
# measured: params at 19 / 21 classes, GMAdds at 1x3x1024x2048 and 19 classes, output stride 16, global pooling
# ("large_kernel" adds < 0.001 GMAdds); torchvision lraspp_mobilenet_v3_large: 3,221,538 params at 21 classes,
# 15.786 GMAdds at 1024x2048 and the 2.086 of its weights metadata at 520x520
COSTS = {
    "lraspp_mbv3_large": (3_221_198, 3_221_538, 15.775),
    "lraspp_mbv3_large_reduced": (1_746_878, 1_747_218, 9.915),
    "lraspp_mbv3_small": (1_077_646, 1_077_954, 5.064),
    "lraspp_mbv3_small_reduced": (515_614, 515_922, 2.832),
    "lraspp_mbv4_conv_small": (1_511_974, 1_512_426, 14.173),
}


def torchvision_lraspp(num_classes: int) -> nn.Module:
    return randomize_batchnorm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes))


@pytest.mark.parametrize("num_classes", [21, 19])
def test_torchvision_checkpoint_reproduces_torchvision(tmp_path, num_classes):
    reference = torchvision_lraspp(num_classes)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model = heads.create_model("lraspp_mbv3_large", num_classes=num_classes, pretrained=str(tmp_path / "tv.pth"))
    for size in [(128, 256), (97, 131)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (model.eval()(x) - reference(x)["out"]).abs().max() <= 1e-5


def test_own_checkpoint_round_trip(tmp_path):
    model = randomize_batchnorm(heads.create_model("lraspp_mbv3_small_reduced", pooling="large_kernel"))
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    again = heads.create_model("lraspp_mbv3_small_reduced", pooling="large_kernel",
                               pretrained=str(tmp_path / "ours.pth"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_foreign_checkpoint_is_rejected_in_one_line(tmp_path):
    torch.save({"head.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an LR-ASPP state dict") as error:
        heads.create_model("lraspp_mbv3_small", pretrained=str(tmp_path / "other.pth"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_params_and_madds(name):
    params_19, params_21, gmadds = COSTS[name]
    with torch.device("meta"):  # shapes only: counting at 1024x2048 costs no compute
        model = heads.create_model(name)
        assert count_params(model) == params_19
        assert count_params(heads.create_model(name, num_classes=21)) == params_21
        assert count_madds(model.eval(), torch.empty(1, 3, 1024, 2048)) / 1e9 == pytest.approx(gmadds, abs=1e-3)


def test_large_matches_torchvision_size_and_cost():
    with torch.device("meta"):
        ours = heads.create_model("lraspp_mbv3_large", num_classes=21).eval()
        theirs = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
        assert count_params(ours) == count_params(theirs) == 3_221_538
        for size, gmadds in [((520, 520), 2.086), ((1024, 2048), 15.786)]:
            x = torch.empty(1, 3, *size)
            assert count_madds(ours, x) == count_madds(theirs, x)
            assert count_madds(ours, x) / 1e9 == pytest.approx(gmadds, abs=1e-3)


@pytest.mark.parametrize("pooling", ["global", "large_kernel"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_at_odd_size(name, pooling):
    model = heads.create_model(name, num_classes=5, pooling=pooling)
    out = model(torch.randn(2, 3, 67, 93))
    assert out.shape == (2, 5, 67, 93)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_stride(output_stride):
    model = heads.create_model("lraspp_mbv3_small", output_stride=output_stride).eval()
    assert model.backbone.feature_info.reduction() == [8, output_stride]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 80)).shape == (1, 19, 64, 80)


def test_large_kernel_pool_sizes_reach_the_pool():
    assert heads.create_model("lraspp_mbv3_small", pooling="large_kernel").head.gate.pool.kernel_size == (49, 49)
    model = heads.create_model("lraspp_mbv3_small", pooling="large_kernel", pool_kernel=(25, 25), pool_stride=(8, 8))
    assert (model.head.gate.pool.kernel_size, model.head.gate.pool.stride) == ((25, 25), (8, 8))


def test_large_kernel_pool_is_the_papers_at_full_size_and_global_when_small():
    pool = LargeKernelAvgPool((49, 49), (16, 20))
    features = torch.randn(1, 8, 64, 128)  # 1024x2048 input at output stride 16
    assert pool(features).shape == (1, 8, 1, 4)
    assert PoolingGate(8, 4, pool)(features).shape == (1, 4, 64, 128)  # the 1x4 gate, upsampled
    x = torch.randn(1, 2, 5, 7)
    assert torch.allclose(pool(x), x.mean((2, 3), keepdim=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(pooling="max"), "pooling='max' is not supported; choose one of 'global', 'large_kernel'"),
    (dict(output_stride=4), "output_stride=4 is not supported"),
    (dict(pool_kernel=(25, 25)), "pool_kernel and pool_stride size the pooling='large_kernel' pool; with "
                                 "pooling='global' they have no effect"),
])
def test_bad_arguments_fail_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        heads.create_model("lraspp_mbv3_small", **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pooling", ["global", "large_kernel"])
def test_torchscript(pooling):
    model = heads.create_model("lraspp_mbv3_small_reduced", pooling=pooling).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 1280)  # wide enough for a 1x2 large-kernel gate
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


def test_torch_export_matches_eager():
    model = randomize_batchnorm(heads.create_model("lraspp_mbv3_small_reduced"))
    x = torch.randn(2, 3, 96, 128)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_onnx_export_matches_pytorch(tmp_path):
    model = heads.create_model("lraspp_mbv3_small_reduced").eval()
    path = tmp_path / "lraspp.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 128, 128),), path, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 96, 160)  # another batch size and shape than at export
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(["logits"], {"image": x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("build", "classes"), [
    (lambda: smp.Unet("tu-mbv3_large_reduced", encoder_weights=None, classes=3), 3),
    (lambda: smp.DeepLabV3Plus("tu-mbv3_large", encoder_weights=None, encoder_output_stride=16), 1),
    (lambda: smp.FPN("tu-mbv3_small", encoder_weights=None), 1),
], ids=["unet", "deeplabv3plus", "fpn"])
def test_smp_builds_on_our_encoders(build, classes):
    model = build()
    out = model(torch.randn(2, 3, 64, 64))  # smp needs sizes divisible by the encoder's output stride
    assert out.shape == (2, classes, 64, 64)
    out.mean().backward()
