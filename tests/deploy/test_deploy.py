"""Deployment: BatchNorm folding, ONNX export through tools/export.py, INT8 quantization, the ONNX Runtime backend."""
import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_batchnorm
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

import mbbackbones
from heads.assets import SAMPLE_IMAGES
from heads.backbone import create_backbone
from heads.cli import export_main, infer_main
from heads.data import read_image
from heads.deploy import export
from heads.deploy.predictor import load_model, make_predictor
from heads.registry import create_model
from heads.segmentation.lraspp import LRASPP

DETECTOR, SEGMENTER, BACKBONE = "ssdlite320_mbv3_small_reduced", "lraspp_mbv3_small_reduced", "mbv3_small_reduced"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spread(model: nn.Module) -> nn.Module:
    """An SSDLite with distinct scores: He-initialised convs up to the class logits (SSDLite's std 0.03 makes
    them all alike) and random BatchNorm; box regression keeps its init, so boxes stay near their anchors."""
    for part in (model.backbone, model.extra, model.head.classification_head):
        for module in part.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
    return randomize_batchnorm(model)


def image_batch(model: nn.Module, size) -> torch.Tensor:
    images = [read_image(SAMPLE_IMAGES[name]) for name in ("kitten", "3dogs")]
    return torch.from_numpy(np.concatenate([export.model_input(model, image, size) for image in images]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """State dicts with random BatchNorm statistics: the detector, the segmenter and a (classification) backbone."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    models = {DETECTOR: spread(create_model(DETECTOR)), SEGMENTER: randomize_batchnorm(create_model(SEGMENTER)),
              BACKBONE: randomize_batchnorm(mbbackbones.create_model(BACKBONE))}
    for name, model in models.items():
        torch.save(model.state_dict(), folder / f"{name}.pth")
    return {name: folder / f"{name}.pth" for name in models}


@pytest.fixture(scope="module")
def detector_files(weights, tmp_path_factory, photos):
    """tools/export.py on the detector, with --int8 calibrated on the three real sample photos."""
    out = tmp_path_factory.mktemp("onnx") / "ssdlite.onnx"
    files = export_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, "--out", str(out), "--int8",
                         "--calibration", str(photos), "--calibration-images", "3"])
    assert files == [out, out.with_suffix(".int8.onnx")]
    return files


def agreement(ours: dict, theirs: dict, iou: float) -> float:
    """The fraction of ``ours`` detections that ``theirs`` has too (same label, box IoU >= ``iou``), in any order."""
    same = (ours["labels"][:, None] == theirs["labels"][None]) & (box_iou(ours["boxes"], theirs["boxes"]) >= iou)
    return same.any(1).float().mean().item()


@torch.no_grad()
def raw_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The network's outputs before any decoding (SSDLite: box deltas and class logits)."""
    if export.model_kind(model) == "detection":
        head = model.predict(x)
        return [head["bbox_regression"], head["cls_logits"]]
    outputs = model(x)
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def opset(path) -> int:
    return next(entry.version for entry in onnx.load(str(path)).opset_import if entry.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("build", [
    lambda: create_backbone(BACKBONE, feature_location="expansion"),
    lambda: spread(create_model(DETECTOR)),
    lambda: create_model(SEGMENTER, pooling="large_kernel", pool_kernel=(3, 3), pool_stride=(2, 2)),
], ids=["backbone", "ssdlite", "lraspp"])
def test_fold_batchnorm_keeps_outputs_and_removes_every_batchnorm(build):
    model = randomize_batchnorm(build())
    folded = export.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is left as it was
    x = torch.rand(2, 3, 160, 160)
    for ours, theirs in zip(raw_outputs(folded, x), raw_outputs(model, x)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_rejects_a_batchnorm_without_a_conv():
    with pytest.raises(ValueError, match="cannot fold BatchNorm '1'"):
        export.fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))


def test_backbone_export_has_a_dynamic_batch_and_size(weights, tmp_path, capsys, photos):
    out = tmp_path / "backbone.onnx"
    export_main(["--backbone", BACKBONE, "--backbone-weights", str(weights[BACKBONE]), "--out", str(out),
                 "--size", "96", "--calibration", str(photos)])
    assert "max |ONNX Runtime - PyTorch| features0" in capsys.readouterr().out
    model = create_backbone(BACKBONE, weights[BACKBONE]).eval()
    onnx_model = export.OnnxModel(out)
    assert opset(out) >= 17 and onnx_model.input_shape == ["batch", 3, "height", "width"]
    differences = export.compare_outputs(model, onnx_model, torch.rand(3, 3, 64, 128))
    assert len(differences) == 5 and max(differences.values()) <= 1e-4


def test_ssdlite_export_gives_the_same_boxes_scores_and_detections(weights, detector_files):
    model = load_model(weights[DETECTOR], DETECTOR).model
    onnx_model = export.OnnxModel(detector_files[0])
    assert opset(detector_files[0]) >= 17 and onnx_model.input_shape == ["batch", 3, 320, 320]
    batch = image_batch(model, 320)
    boxes, scores = onnx_model(batch)
    with torch.no_grad():
        expected_boxes, expected_scores = model.forward_batch(batch)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=0)
    for index in range(len(batch)):
        ours, theirs = model.select(boxes[index], scores[index], (480, 640)), model.select(
            expected_boxes[index], expected_scores[index], (480, 640))
        assert len(theirs["labels"]) == model.detections_per_img
        assert agreement(ours, theirs, iou=0.999) >= 0.99  # near-equal scores may swap at the 300th
    with pytest.raises(ValueError, match="ssdlite.onnx takes batchx3x320x320 images, got 1x3x256x256"):
        onnx_model(torch.rand(1, 3, 256, 256))


def test_lraspp_export_takes_any_size(weights, tmp_path, photos):
    out = tmp_path / "lraspp.onnx"
    export_main(["--weights", str(weights[SEGMENTER]), "--model", SEGMENTER, "--out", str(out), "--size", "64", "128",
                 "--calibration", str(photos), "--calibration-images", "2"])
    model = load_model(weights[SEGMENTER], SEGMENTER).model
    onnx_model = export.OnnxModel(out)
    assert opset(out) >= 17
    for size in [(64, 128), (96, 160)]:
        differences = export.compare_outputs(model, onnx_model, image_batch(model, size))
        assert differences["logits"] <= 1e-4


def test_large_kernel_pooling_exports_at_a_fixed_size(tmp_path):
    model = randomize_batchnorm(LRASPP(BACKBONE, pooling="large_kernel", pool_kernel=(3, 3), pool_stride=(1, 2)))
    assert not export.dynamic_size(model)
    onnx_model = export.OnnxModel(export.export_onnx(model, tmp_path / "lraspp.onnx", size=(96, 160)))
    assert onnx_model.input_shape == ["batch", 3, 96, 160]
    assert export.compare_outputs(model, onnx_model, image_batch(model, (96, 160)))["logits"] <= 1e-4


def test_int8_model_keeps_the_top_detections(weights, detector_files):
    model = load_model(weights[DETECTOR], DETECTOR).model
    batch = image_batch(model, 320)
    (boxes, scores), (boxes8, scores8) = (export.OnnxModel(path)(batch) for path in detector_files)
    assert np.corrcoef(scores[..., 1:].flatten(), scores8[..., 1:].flatten())[0, 1] > 0.9
    kinds = {node.op_type for node in onnx.load(str(detector_files[1])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    for index in range(len(batch)):
        fp32, int8 = (model.select(b[index], s[index], (320, 320)) for b, s in ((boxes, scores), (boxes8, scores8)))
        top = {key: value[:10] for key, value in fp32.items()}
        assert agreement(top, {key: value[:30] for key, value in int8.items()}, iou=0.5) >= 0.7


@pytest.mark.parametrize("name", [DETECTOR, SEGMENTER])
def test_infer_onnxruntime_draws_what_pytorch_draws(name, weights, detector_files, tmp_path, photos):
    common = ["--weights", str(weights[name]), "--model", name, str(photos), "--score-thresh", "0.2"]
    infer_main([*common, "--out", str(tmp_path / "pytorch")])
    onnx_file = detector_files[0] if name == DETECTOR else None  # the segmenter is exported on the fly
    infer_main([*common, "--out", str(tmp_path / "onnxruntime"), "--backend", "onnxruntime",
                *(["--onnx", str(onnx_file)] if onnx_file else [])])
    pictures = sorted(p.name for p in (tmp_path / "pytorch").iterdir())
    assert pictures == ["3dogs.png", "gray.png", "kitten.png"]
    assert sorted(p.name for p in (tmp_path / "onnxruntime").iterdir()) == pictures
    for picture in pictures:
        ours, theirs = (np.asarray(Image.open(tmp_path / backend / picture)) for backend in ("pytorch", "onnxruntime"))
        assert (ours != theirs).any(-1).mean() < 0.001

    loaded = load_model(weights[name], name)
    image = read_image(SAMPLE_IMAGES["3dogs"])
    expected, got = make_predictor(loaded)(image)[0], make_predictor(loaded, "onnxruntime", onnx_file)(image)[0]
    if name == DETECTOR:
        assert agreement(got, expected, iou=0.999) >= 0.99
    else:
        assert (got == expected).mean() > 0.999


def test_onnx_file_needs_the_onnxruntime_backend(weights, detector_files, tmp_path, capsys, photos):
    with pytest.raises(SystemExit):
        infer_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, str(photos), "--out", str(tmp_path),
                    "--onnx", str(detector_files[0])])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs backend='onnxruntime'" in error
