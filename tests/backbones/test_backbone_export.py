"""features_only models script, compile and export to ONNX with the same outputs."""
import numpy as np
import onnxruntime
import pytest
import timm
import torch

import mbbackbones  # noqa: F401  (registers the models)


def features(name="mbv3_large_reduced", **kwargs):
    return timm.create_model(name, features_only=True, **kwargs).eval()


@pytest.mark.parametrize("name", ["mbv3_large_reduced", "mbv4_hybrid_medium"])
@pytest.mark.parametrize("location", ["block", "expansion"])
def test_torchscript(name, location):
    model = features(name, feature_location=location, output_stride=16)
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for ours, theirs in zip(scripted(x), model(x)):
            assert torch.allclose(ours, theirs, atol=1e-6)


def test_torch_compile_fullgraph():
    model = features("mbv3_small", feature_location="expansion")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # graph capture without codegen
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(compiled(x), model(x)):
            assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("name", ["mbv4_conv_small", "mbv4_hybrid_medium"])
def test_torch_export_matches_eager(name):
    model = features(name, feature_location="expansion")
    exported = torch.export.export(model, (torch.randn(1, 3, 96, 128),)).module()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for ours, theirs in zip(exported(x), model(x), strict=True):
            assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("name", ["mbv3_large_reduced", "mbv2_100", "mbv1_050", "mbv4_conv_small",
                                  "mbv4_hybrid_medium"])
def test_onnx_export_matches_pytorch(tmp_path, name):
    model = features(name, feature_location="expansion")
    path = tmp_path / "features.onnx"
    outputs = [f"c{i + 1}" for i in range(5)]
    torch.onnx.export(model, (torch.randn(1, 3, 128, 128),), path, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=outputs,
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 96, 160)  # another batch size and shape than at export
    with torch.no_grad():
        expected = model(x)
    got = session.run(outputs, {"image": x.numpy()})
    for ours, theirs in zip(got, expected):
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
