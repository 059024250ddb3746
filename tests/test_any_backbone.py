"""SSDLite and LR-ASPP on MobileNetV4 and on plain timm backbones ("timm/<name>"): taps read from feature_info,
the 'expansion' fallback recorded, and each learns (a fixed batch's loss falls) and exports (ONNX Runtime equals
PyTorch)."""
import warnings

import numpy as np
import pytest
import torch
from conftest import REAL, RUNTIME_PACKAGES, randomize_batchnorm

import heads
from heads.data import read_image
from heads.deploy import export, runtimes
from heads.detection.coco import CocoDetection
from heads.segmentation.cityscapes import Cityscapes
from heads.training.tasks import SegmentationTask
from mbbackbones.choices import ArgumentError

DETECTORS = [("ssdlite320_mbv4_conv_small", {}), ("ssdlite320_mbv3_large", {"backbone": "timm/efficientnet_lite0"})]
SEGMENTERS = [("lraspp_mbv4_conv_small", {}), ("lraspp_mbv3_large", {"backbone": "timm/efficientnet_lite0"})]


def ids(cases):
    return [kwargs.get("backbone", name) for name, kwargs in cases]


def test_timm_backbones_record_their_taps():
    detector = heads.create_model("ssdlite320_mbv3_large", backbone="timm/mobilenetv4_conv_small")
    assert detector.backbone.feature_info.reduction() == [16, 32] and detector.meta["feature_location"] == "expansion"
    with pytest.warns(UserWarning, match="timm/efficientnet_lite0 has no 'downsample' feature taps in timm .*"
                                         "block taps instead: \\[40, 320\\] channels at strides \\[8, 16\\]"):
        segmenter = heads.create_model("lraspp_mbv3_large", backbone="timm/efficientnet_lite0")
    assert segmenter.meta["feature_location"] == "block"
    assert heads.create_model("lraspp_mbv4_conv_small").meta["feature_location"] == "downsample"
    with pytest.warns(UserWarning, match="timm/resnet18 has no 'downsample' feature taps in timm .*TypeError"):
        resnet = heads.create_model("lraspp_mbv3_large", backbone="timm/resnet18")  # no feature_location argument
    assert resnet.backbone.feature_info.channels() == [128, 512] and resnet.meta["feature_location"] == "block"
    with pytest.raises(ArgumentError, match="timm/efficientnet_lite9: timm has no model 'efficientnet_lite9'"):
        heads.create_model("ssdlite320_mbv3_large", backbone="timm/efficientnet_lite9")


@pytest.mark.parametrize("name, kwargs", DETECTORS, ids=ids(DETECTORS))
def test_detector_learns_a_real_image(name, kwargs):
    torch.manual_seed(0)
    dataset = CocoDetection(REAL / "coco_sample", "val2017", train=True)
    image, target = dataset[0]
    width = image.shape[-1]  # batch 2, the image and its flip: the last extra layer's 1x1 map needs two for BN
    flipped = {"boxes": target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0]), "labels": target["labels"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = heads.create_model(name, num_classes=dataset.num_classes, **kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = sum(model([image, image.flip(-1)], [target, flipped]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name, kwargs", SEGMENTERS, ids=ids(SEGMENTERS))
def test_segmenter_learns_a_real_frame(name, kwargs):
    torch.manual_seed(0)
    image, mask = Cityscapes(REAL / "cityscapes_sample", split=None)[0]
    batch = (image[None, :, ::4, ::4], mask[None, ::4, ::4])  # 256 x 512
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = heads.create_model(name, num_classes=19, **kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = SegmentationTask.losses(model, batch, "cpu")["cross_entropy"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


FORMATS = list(export.FORMATS)
EXPORTS = [(name, {}, format, False) for name in ("ssdlite320_mbv4_conv_small", "lraspp_mbv4_conv_small")
           for format in FORMATS]
EXPORTS += [(name, {}, format, True) for name in ("ssdlite320_mbv4_conv_small", "lraspp_mbv4_conv_small")
            for format in ("onnx", "openvino")]  # INT8 ExecuTorch / LiteRT pass too, ~100 s each: left out here
EXPORTS += [(name, kwargs, "onnx", False) for name, kwargs in (DETECTORS + SEGMENTERS)[1::2]]


@pytest.mark.parametrize("name, kwargs, format, int8", EXPORTS,
                         ids=[f"{kwargs.get('backbone', name)}-{format}{'-int8' * int8}"
                              for name, kwargs, format, int8 in EXPORTS])
def test_exports_pass_the_export_check(name, kwargs, format, int8, tmp_path):
    pytest.importorskip(RUNTIME_PACKAGES[format])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_batchnorm(heads.create_model(name, **kwargs))
    size = model.export_size(None if not model.dynamic_size() else (128, 256))
    images = [export.model_input(model, read_image(p), size) for p in heads.SAMPLE_IMAGES.values()]
    path = runtimes.export(model, tmp_path / f"model{export.FORMATS[format]}", size=size, int8=int8,
                           calibration=images if int8 else None)
    checks = runtimes.check(model, runtimes.load(path), torch.from_numpy(np.concatenate(images)))
    assert all(check.passed for check in checks), "; ".join(map(str, checks))
