"""Deployment: BatchNorm folding, each runtime against PyTorch (fp32 and INT8), metadata, errors, tools/export.py."""
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REAL, RUNTIME_PACKAGES, randomize_batchnorm
from torch import nn

import mbbackbones
from heads.assets import SAMPLE_IMAGES
from heads.backbone import create_backbone
from heads.cli import export_main
from heads.data import read_image
from heads.deploy import export, runtimes
from heads.detection import ssdlite
from heads.detection.ssdlite import detection_agreement
from heads.registry import create_model
from heads.segmentation.lraspp import LRASPP

DETECTOR, SEGMENTER, BACKBONE = "ssdlite320_mbv3_small_reduced", "lraspp_mbv3_small_reduced", "mbv3_small_reduced"
SIZES = {DETECTOR: None, SEGMENTER: (64, 128)}  # small: ExecuTorch and LiteRT graphs are fixed at the export size
# ExecuTorch and LiteRT convert SSDLite in 25-45 s per precision on one core: their INT8 detector is a slow test
FORMATS = ["onnx", "openvino", "executorch", "tflite"]
SLOW_INT8 = {("executorch", DETECTOR), ("tflite", DETECTOR)}  # test_postprocessed's
pytestmark = pytest.mark.usefixtures("one_thread")


def spread(model: nn.Module, *parts: nn.Module) -> nn.Module:
    """He-initialised convs in ``parts`` (SSDLite's std 0.03 makes all scores alike) and random BatchNorm, so that
    outputs vary from anchor to anchor and pixel to pixel."""
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
    return randomize_batchnorm(model)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """The detector (box regression keeps its init, so boxes stay near their anchors) and the segmenter."""
    torch.manual_seed(0)
    detector, segmenter = create_model(DETECTOR), create_model(SEGMENTER)
    return {DETECTOR: spread(detector, detector.backbone, detector.extra, detector.head.classification_head),
            SEGMENTER: spread(segmenter, segmenter)}


@pytest.fixture(scope="module")
def weights(models, tmp_path_factory):
    """State dict files of the detector, the segmenter and a (classification) backbone."""
    folder = tmp_path_factory.mktemp("weights")
    files = {name: folder / f"{name}.pth" for name in (*models, BACKBONE)}
    for name, model in models.items():
        torch.save(model.state_dict(), files[name])
    torch.save(randomize_batchnorm(mbbackbones.create_model(BACKBONE)).state_dict(), files[BACKBONE])
    return files


def real_images(name: str, model: nn.Module) -> torch.Tensor:
    """Real inputs: two photos for the detector; the real Cityscapes frame and a photo for the segmenter."""
    paths = [SAMPLE_IMAGES["kitten"], SAMPLE_IMAGES["3dogs"]]
    if name == SEGMENTER:
        paths[0] = next((REAL / "cityscapes_sample" / "leftImg8bit").glob("*.png"))
    return torch.from_numpy(np.concatenate([export.model_input(model, read_image(p), SIZES[name]) for p in paths]))


def calibration(name: str, model: nn.Module) -> list[np.ndarray]:
    """The real images above and the grayscale photo, one batch each."""
    images = list(real_images(name, model).numpy()[:, None])
    return images + [export.model_input(model, read_image(REAL / "gray.jpg"), SIZES[name])]


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """``exported(format, name, int8)``: the raw file (the graph ends in ``forward_batch``'s outputs, as every file
    before the post-processing moved inside; ``test_postprocessed`` checks the others), exported once per module."""
    folder, files = tmp_path_factory.mktemp("exports"), {}

    def get(format: str, name: str, int8: bool = False):
        pytest.importorskip(RUNTIME_PACKAGES[format])
        if (format, name, int8) not in files:
            model = models[name]
            path = folder / f"{name}{'.int8' if int8 else ''}{runtimes.FORMATS[format]}"
            files[format, name, int8] = runtimes.export(model, path, int8=int8, size=SIZES[name], postprocess=False,
                                                        calibration=calibration(name, model) if int8 else None)
        return files[format, name, int8]

    return get


@torch.no_grad()
def pytorch_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    return list(model.forward_batch(images))


# -- BatchNorm folding ----------------------------------------------------------------------------------------------

@torch.no_grad()
def raw_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The network's outputs before any decoding (SSDLite: box deltas and class logits)."""
    if export.model_kind(model) == "detection":
        head = model.predict(x)
        return [head["bbox_regression"], head["cls_logits"]]
    outputs = model(x)
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


@pytest.mark.parametrize("build", [
    lambda: create_backbone(BACKBONE, feature_location="expansion"),
    lambda: create_model(DETECTOR),
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


def test_fold_batchnorm_keeps_a_batchnorm_without_a_conv_in_eval_mode():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3))).train()
    folded = export.fold_batchnorm(model)
    assert isinstance(folded[2], nn.BatchNorm2d) and not folded[2].training
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model.eval()(x))


# -- each runtime against PyTorch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("format", FORMATS)
def test_fp32_detector_gives_pytorchs_boxes_scores_and_detections(format, models, exported):
    model = models[DETECTOR]
    runtime = runtimes.load(exported(format, DETECTOR), threads=1)
    images = real_images(DETECTOR, model)
    (boxes, scores), (expected_boxes, expected_scores) = runtime(images), pytorch_outputs(model, images)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-3, rtol=0)  # pixels
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=0)
    for index in range(len(images)):
        ours, theirs = (model.select(b[index], s[index], (480, 640))
                        for b, s in ((boxes, scores), (expected_boxes, expected_scores)))
        assert len(theirs["labels"]) == model.detections_per_img
        # the same detections; near-equal scores may swap places at the 300th
        assert detection_agreement(theirs, ours, 300, 300, iou=0.999) >= 0.99


@pytest.mark.parametrize("format", FORMATS)
def test_fp32_segmenter_gives_pytorchs_logits(format, models, exported):
    model = models[SEGMENTER]
    runtime = runtimes.load(exported(format, SEGMENTER), threads=1)
    images = real_images(SEGMENTER, model)
    (logits,), (expected,) = runtime(images), pytorch_outputs(model, images)
    assert len(expected.argmax(1).unique()) > 3  # a segmenter with varied masks, not one class everywhere
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("format", ["onnx", "openvino"])  # raw INT8 detectors (test_postprocessed: every format's)
def test_int8_detector_keeps_the_top_detections(format, models, exported):
    model = models[DETECTOR]
    runtime = runtimes.load(exported(format, DETECTOR, int8=True), threads=1)
    assert runtime.metadata["precision"] == "int8"
    images = real_images(DETECTOR, model)
    (boxes, scores), (expected_boxes, expected_scores) = runtime(images), pytorch_outputs(model, images)
    assert np.corrcoef(scores[..., 1:].flatten(), expected_scores[..., 1:].flatten())[0, 1] > 0.9
    for index in range(len(images)):
        ours, theirs = (model.select(b[index], s[index], (480, 640))
                        for b, s in ((boxes, scores), (expected_boxes, expected_scores)))
        assert detection_agreement(theirs, ours, top=10, among=30, iou=0.5) >= 0.7


@pytest.mark.parametrize("format", FORMATS)
def test_int8_segmenter_keeps_the_masks(format, models, exported):
    model = models[SEGMENTER]
    runtime = runtimes.load(exported(format, SEGMENTER, int8=True), threads=1)
    images = real_images(SEGMENTER, model)
    (logits,), (expected,) = runtime(images), pytorch_outputs(model, images)
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("format", FORMATS)
def test_int8_files_hold_int8_weights(format, exported):
    """Four times smaller weights, or the layers stayed float (as they once did on ExecuTorch and LiteRT)."""
    size = lambda path: sum(file.stat().st_size for file in runtimes.exported_files(path))  # noqa: E731
    assert size(exported(format, SEGMENTER, int8=True)) < 0.5 * size(exported(format, SEGMENTER))


def test_int8_files_hold_integer_operators(exported):
    onnx = pytest.importorskip("onnx")
    kinds = {node.op_type for node in onnx.load(str(exported("onnx", DETECTOR, int8=True))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    openvino = pytest.importorskip("openvino")
    ir = openvino.Core().read_model(str(exported("openvino", DETECTOR, int8=True)))
    assert sum(op.get_type_name() == "FakeQuantize" for op in ir.get_ordered_ops()) > 50


def test_onnx_and_openvino_take_any_size_and_batch(models, exported):
    model = models[SEGMENTER]
    for format in ("onnx", "openvino"):
        runtime = runtimes.load(exported(format, SEGMENTER))
        assert runtime.metadata["input_size"] is None
        for size in [(64, 128), (96, 160)]:
            images = torch.rand(3, 3, *size)
            torch.testing.assert_close(runtime(images)[0], pytorch_outputs(model, images)[0], atol=1e-4, rtol=0)


def test_backbone_and_large_kernel_exports(weights, tmp_path):
    backbone = create_backbone(BACKBONE, weights[BACKBONE]).eval()
    runtime = runtimes.load(runtimes.export(backbone, tmp_path / "backbone.onnx", size=96))
    assert runtime.metadata["outputs"] == [f"features{i}" for i in range(5)] and runtime.metadata["input_size"] is None
    images = torch.rand(2, 3, 64, 128)
    expected = backbone(export.normalizer(backbone)(images))
    for ours, theirs in zip(runtime(images), expected):
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-4, rtol=0)

    model = randomize_batchnorm(LRASPP(BACKBONE, pooling="large_kernel", pool_kernel=(3, 3), pool_stride=(1, 2)))
    runtime = runtimes.load(runtimes.export(model, tmp_path / "lraspp.onnx", size=(96, 160), postprocess=False))
    assert runtime.metadata["input_size"] == [96, 160]
    images = torch.rand(1, 3, 96, 160)
    torch.testing.assert_close(runtime(images)[0], pytorch_outputs(model, images)[0], atol=1e-4, rtol=0)


# -- metadata and errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("format", FORMATS)
def test_metadata_round_trip(format, models, exported, tmp_path):
    path = exported(format, DETECTOR)
    assert runtimes.read_metadata(path) == {**models[DETECTOR].meta, "format": format, "precision": "fp32",
                                            "input_size": [320, 320], "outputs": ["boxes", "scores"],
                                            "postprocessed": False, "input_layout": "NCHW", "input_dtype": "float32"}
    for file in runtimes.exported_files(path):
        shutil.copy(file, tmp_path)
    copy = tmp_path / path.name
    if format == "executorch":  # held in the program (its constant method), written by the export alone
        with pytest.raises(ValueError, match=r"reduced.pte: an ExecuTorch program's metadata is written when it is "
                                             "exported; export it again"):
            runtimes.write_metadata(copy, {"task": "detection"})
        assert not list(tmp_path.glob("*.json"))
        return
    runtimes.write_metadata(copy, {"task": "detection", "note": [1, 2.5, None]})
    assert runtimes.read_metadata(copy) == {"task": "detection", "note": [1, 2.5, None]}


def foreign_program(path):
    """An ExecuTorch program of another exporter (no mbbackbones metadata), as an earlier version of ours wrote them
    (the metadata in a sidecar)."""
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(nn.Conv2d(3, 4, 1).eval(), (torch.rand(1, 3, 8, 8),))
    path.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    return path


def test_files_without_metadata_or_corrupt_are_one_line_errors(exported, tmp_path):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 1), (torch.rand(1, 3, 8, 8),), str(foreign), dynamo=False)
    with pytest.raises(ValueError, match=r"foreign.onnx has no mbbackbones metadata: .* export it again"):
        runtimes.load(foreign)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")
    with pytest.raises(ValueError, match=r"corrupt.onnx is not a valid ONNX file \(InvalidProtobuf\)"):
        runtimes.load(corrupt)
    pytest.importorskip("executorch")
    program = foreign_program(tmp_path / "model.pte")
    with pytest.raises(ValueError, match=r"model.pte has no mbbackbones metadata \(model.pte.json beside it\)"):
        runtimes.load(program)
    (tmp_path / "broken.pte").write_bytes(b"not a program")
    with pytest.raises(ValueError, match=r"broken.pte is not a loadable ExecuTorch program \(.*\): export it again"):
        runtimes.load(tmp_path / "broken.pte")
    with pytest.raises(ValueError, match="suffix is none of .onnx, .xml, .pte, .tflite"):
        runtimes.load(tmp_path / "model.engine")


def test_broken_companions_and_suffix_case(exported, tmp_path):
    """What outside checks found: a missing OpenVINO .bin, an upper-case suffix, a broken metadata sidecar."""
    from heads.loading import load

    pytest.importorskip("openvino")
    ir = tmp_path / "ir" / "model.xml"
    ir.parent.mkdir()
    shutil.copy(exported("openvino", SEGMENTER), ir)  # without its .bin
    with pytest.raises(ValueError, match=r"model.xml: its weights model.bin are missing; copy the .xml and the .bin"):
        runtimes.load(ir)
    upper = tmp_path / "MODEL.ONNX"
    shutil.copy(exported("onnx", SEGMENTER), upper)
    assert load(upper).runtime.format == "onnx"  # an exported file, not a truncated PyTorch checkpoint
    pytest.importorskip("executorch")
    program = foreign_program(tmp_path / "model.pte")  # an earlier export: its metadata in a sidecar
    for text, message in [('{"task": "segm', "is not valid JSON"), ("[1, 2]", "is not an mbbackbones record")]:
        (tmp_path / "model.pte.json").write_text(text)
        with pytest.raises(ValueError, match=rf"model.pte: its metadata \(model.pte.json beside it\) {message}"):
            runtimes.load(program)
    (tmp_path / "model.pte.json").write_text('{"task": "segmentation", "format": "executorch"}')
    assert runtimes.read_metadata(program) == {"task": "segmentation", "format": "executorch"}
    embedded = tmp_path / "embedded.pte"
    shutil.copy(exported("executorch", SEGMENTER), embedded)
    (tmp_path / "embedded.pte.json").write_text("[1, 2]")  # a stale sidecar: the program's own metadata wins
    assert runtimes.read_metadata(embedded) == runtimes.read_metadata(exported("executorch", SEGMENTER))


def test_a_mismatched_file_is_a_one_line_error(exported):
    with pytest.raises(ValueError, match=r"is a segmentation model \(.*\), not a detection one"):
        runtimes.load(exported("onnx", SEGMENTER), task="detection")
    runtime = runtimes.load(exported("onnx", DETECTOR), task="detection")
    with pytest.raises(ValueError, match="takes 320x320 .* got 64x128"):
        runtime(torch.rand(1, 3, 64, 128))
    with pytest.raises(ValueError, match=r"takes float32 \[B, 3, H, W\] images"):
        runtime(torch.rand(3, 320, 320))


@pytest.mark.parametrize("format, module, extra", [("openvino", "openvino", "openvino"),
                                                   ("tflite", "litert_torch", "litert"),
                                                   ("executorch", "executorch", "executorch")])
def test_a_missing_runtime_names_its_extra(format, module, extra, models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'mbbackbones\[{extra}\]'$"):
        runtimes.export(models[SEGMENTER], tmp_path / f"model{runtimes.FORMATS[format]}", size=(32, 64))
    assert list(tmp_path.iterdir()) == []


def test_onnx_runtime_options(exported):
    path = exported("onnx", DETECTOR)
    runtime = runtimes.load(path, threads=1, providers=["CPUExecutionProvider"], optimization="basic")
    assert runtime.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="optimization='al' is not supported.*Did you mean 'all'"):
        runtimes.load(path, optimization="al")


# -- tools/export.py -----------------------------------------------------------------------------------------------

def test_export_tool_writes_only_its_file_and_states_a_verdict(weights, tmp_path, capsys):
    out = tmp_path / "out" / "ssdlite.onnx"
    files = export_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, "--out", str(out)])
    assert files == [out] and list(out.parent.iterdir()) == [out]
    printed = capsys.readouterr().out
    assert "(onnx, fp32, post-processing inside)" in printed and "FAIL" not in printed
    assert "top-100 detections found in the other's (score within 0.0001, box within 0.01 px) 1 (>= 0.9): PASS" \
        in printed
    assert runtimes.read_metadata(out)["postprocessed"]
    export_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, "--out", str(out), "--raw"])
    printed = capsys.readouterr().out
    assert "max |boxes difference| / input size" in printed and "(<= 0.0001): PASS" in printed and "FAIL" not in printed
    assert not runtimes.read_metadata(out)["postprocessed"]
    files = export_main(["--weights", str(weights[SEGMENTER]), "--model", SEGMENTER, "--format", "openvino",
                         "--size", "64", "128", "--out", str(tmp_path / "ir" / "lraspp.xml")])
    assert sorted(files) == sorted((tmp_path / "ir").iterdir()) and {f.suffix for f in files} == {".xml", ".bin"}


@pytest.mark.parametrize("flags, name, value, verdict", [
    (["--raw"], "FP32_BOX_TOLERANCE", -1.0, "(<= -1): FAIL"),
    ([], "detection_agreement", lambda *args, **kwargs: 0.5, "0.5 (>= 0.9): FAIL"),  # half the detections differ
], ids=["raw", "postprocessed"])
def test_export_tool_fails_beyond_the_tolerance(flags, name, value, verdict, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ssdlite, name, value)
    with pytest.raises(SystemExit, match="differs from PyTorch beyond the tolerance"):
        export_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, "--out", str(tmp_path / "d.onnx"),
                     *flags])
    assert verdict in capsys.readouterr().out


def test_export_tool_calibrates_on_the_runs_validation_images(tmp_path, capsys, monkeypatch):
    from heads.segmentation.builtin import builtin_cityscapes
    from heads.training.config import make_config
    from heads.training.engine import Trainer
    from heads.training.tasks import get_task

    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path / "data"))
    builtin_cityscapes(tmp_path / "cityscapes", num_train=4, num_val=4, size=(64, 128))  # the run's own data
    config = make_config({"task": "segmentation", "model": SEGMENTER,
                          "output": str(tmp_path / "run"), "dataset": "cityscapes",
                          "data_root": str(tmp_path / "cityscapes"),
                          "crop_size": [64, 128], "max_steps": 1, "batch_size": 2, "workers": 0, "eval_every": 0,
                          "optimizer": "adam", "lr": 1e-3, "lr_batch": 2})
    Trainer(config, get_task("segmentation")).fit()
    export_main(["--weights", str(tmp_path / "run"), "--out", str(tmp_path / "int8.onnx"), "--int8",
                 "--size", "64", "128", "--calibration-images", "4"])
    printed = capsys.readouterr().out
    assert f"calibrated on 4 images from {tmp_path / 'cityscapes' / 'leftImg8bit' / 'val'}" in printed
    assert "pixels of the same class" in printed
    assert not (tmp_path / "data").exists()  # not the built-in set of the data home


@pytest.mark.parametrize("argv, message", [
    (["--int8"], "--int8 needs calibration images and {weights} has no run config"),
    (["--out", "{tmp}/folder.onnx"], "--out {tmp}/folder.onnx is a folder; give the file to write"),
    (["--out", "{tmp}/file.txt/model.onnx"], "cannot write into {tmp}/file.txt: a file is in the way"),
    (["--out", "{tmp}/model.engine"], "cannot tell the format of {tmp}/model.engine"),
    (["--format", "openvino"], "{tmp}/model.onnx: openvino files end in .xml"),
])
def test_export_tool_errors_are_one_line(argv, message, weights, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "folder.onnx").mkdir()
    weights_file = str(weights[DETECTOR])
    argv = ["--weights", weights_file, "--model", DETECTOR, "--out", f"{tmp_path}/model.onnx", *argv]
    with pytest.raises(SystemExit) as exit_info:
        export_main([a.format(tmp=tmp_path) for a in argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert message.format(tmp=tmp_path, weights=weights_file) in error


@pytest.mark.parametrize("format", ["executorch", "tflite"])
def test_the_predictor_resizes_photos_to_a_fixed_size_segmenter(format, models, exported):
    """Fixed-size files take every photo at their own size; the mask comes back at the photo's."""
    from heads.deploy.predictor import Predictor

    photo, model = read_image(SAMPLE_IMAGES["kitten"]), models[SEGMENTER]
    mask = Predictor(exported(format, SEGMENTER))(photo)[0].mask
    with torch.no_grad():
        small = model.forward_batch(torch.from_numpy(export.model_input(model, photo, SIZES[SEGMENTER])))[0]
    expected = torch.nn.functional.interpolate(small.argmax(1, keepdim=True).float(), size=photo.shape[:2])[0, 0]
    assert mask.shape == photo.shape[:2] and (torch.from_numpy(mask) == expected).float().mean() > 0.97
