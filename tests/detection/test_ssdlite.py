"""SSDLite: torchvision parity, the paper's architecture numbers, detection I/O and errors."""
import numpy as np
import pytest
import torch
from benchmarking.workloads import calibrated_torchvision_detector
from conftest import randomize_batchnorm, same_detections
from PIL import Image
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.ops import batched_nms

import heads
from heads.assets import SAMPLE_IMAGES
from heads.detection.ssdlite import detection_agreement, greedy_nms, select_detections
from mbbackbones.checkpoint import CheckpointError
from mbbackbones.profile import count_madds, count_params

# ours at 320x320, 91 classes: params, GMAdds (torch flop counter; 1 MAdd = 2 flops). Paper Table 6 for comparison:
# V3-L 4.97M/0.62B, V3-L(reduced) 3.22M/0.51B, V3-S 2.49M/0.21B, V3-S(reduced) 1.77M/0.16B, V2 4.3M/0.80B, V1 5.1M/1.3B.
EXPECTED = {
    "ssdlite320_mbv3_large_reduced": (3_440_060, 0.5832),  # == torchvision ssdlite320_mobilenet_v3_large
    "ssdlite320_mbv3_large": (5_198_540, 0.6898),
    "ssdlite320_mbv3_small_reduced": (1_868_108, 0.1951),
    "ssdlite320_mbv3_small": (2_600_636, 0.2432),
    "ssdlite320_mbv2_100": (4_664_988, 0.8701),
    "ssdlite320_mbv1_100": (5_393_116, 1.3808),
    "ssdlite320_mbv4_conv_small": (3_431_420, 0.6063),  # C4 expansion 576, C5 960
    "ssdlite320_mbv4_conv_medium": (9_600_236, 2.0061),
}


def real_images():
    return [torch.from_numpy(np.array(Image.open(SAMPLE_IMAGES[name]).convert("RGB"))).permute(2, 0, 1).float() / 255
            for name in ("3dogs", "kitten")]


@pytest.fixture(scope="module")
def torchvision_pair(tmp_path_factory):
    torch.manual_seed(0)
    images = real_images()
    reference = calibrated_torchvision_detector(images)  # BN statistics from real images: no all-tied scores
    path = tmp_path_factory.mktemp("ssd") / "ssdlite320_tv.pth"
    torch.save(reference.state_dict(), path)
    ours = heads.create_model("ssdlite320_mbv3_large_reduced", num_classes=91, pretrained=str(path)).eval()
    return reference, ours, images + [torch.rand(3, 300, 200)], path


def test_torchvision_checkpoint_gives_the_same_detections(torchvision_pair):
    reference, ours, images, _ = torchvision_pair
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    assert all(len(a["boxes"]) == len(e["boxes"]) > 0 and same_detections(e, a) for e, a in zip(expected, actual))


def test_torchvision_checkpoint_gives_the_same_losses(torchvision_pair):
    reference, ours, images, _ = torchvision_pair
    targets = [{"boxes": torch.tensor([[10.0, 20, 200, 300], [300, 100, 600, 400]]), "labels": torch.tensor([3, 17])},
               {"boxes": torch.tensor([[0.0, 0, 100, 100]]), "labels": torch.tensor([5])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    reference.train(), ours.train()
    try:
        expected, actual = reference(images, targets), ours(images, targets)
    finally:
        reference.eval(), ours.eval()
    assert set(actual) == {"bbox_regression", "classification"}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_our_checkpoint_round_trips(torchvision_pair, tmp_path):
    _, ours, images, _ = torchvision_pair
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    again = heads.create_model("ssdlite320_mbv3_large_reduced", pretrained=str(tmp_path / "ours.pth")).eval()
    with torch.no_grad():
        assert torch.equal(again(images[:1])[0]["boxes"], ours(images[:1])[0]["boxes"])


@pytest.mark.parametrize("name", heads.list_models("detection"))
def test_architecture_numbers(name):
    model = heads.create_model(name, num_classes=91).eval()
    params, gmadds = EXPECTED[name]
    assert count_params(model) == params
    assert count_madds(model.forward_batch, torch.rand(1, 3, 320, 320)) / 1e9 == pytest.approx(gmadds, abs=1e-4)
    info = model.backbone.feature_info
    assert info.reduction() == [16, 32]  # the C4 expansion tap and C5, as in the paper


@pytest.mark.parametrize("name", heads.list_models("detection"))
def test_detection_io(name):
    model = heads.create_model(name, num_classes=5)
    images = [torch.rand(3, 200, 260), torch.rand(3, 320, 320)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 120, 150]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    boxes = out[0]["boxes"]
    assert (boxes[:, 2] <= 260 + 1e-3).all() and (boxes[:, 3] <= 200 + 1e-3).all() and (boxes >= 0).all()
    assert out[0]["labels"].min() >= 1 and out[0]["labels"].max() < 5
    assert (out[0]["scores"][:-1] >= out[0]["scores"][1:]).all()


def test_any_backbone_through_the_config():
    model = heads.create_model("ssdlite320_mbv3_large", backbone="mbv2_050", num_classes=3).eval()
    boxes, scores = model.forward_batch(torch.rand(2, 3, 320, 320))
    assert boxes.shape == (2, 3234, 4) and scores.shape == (2, 3234, 3)


def test_forward_batch_and_select_give_torchvisions_detections(torchvision_pair):
    """The export path (plain tensors out, then ``select_detections``, as the predictors run it) against torchvision."""
    reference, ours, images, _ = torchvision_pair
    with torch.no_grad():
        for image, expected in zip(images, reference(images)):
            boxes, scores = ours.forward_batch(ours.resize(image)[None])
            actual = select_detections(boxes[0], scores[0], tuple(image.shape[-2:]), ours.size, **ours.settings())
            assert len(actual["boxes"]) == len(expected["boxes"]) > 0 and same_detections(expected, actual)


def test_torchscript_matches_eager(torchvision_pair):
    """As torchvision's detectors script: the same lists of images and dicts in and out, in eval and training."""
    _, ours, images, _ = torchvision_pair
    assert ours.meta["task"] == "detection"  # metadata (a plain dict) does not get in the way
    scripted = torch.jit.script(ours)
    with torch.no_grad():
        expected, actual = ours(images), scripted(images)
    for e, a in zip(expected, actual, strict=True):
        assert e.keys() == a.keys() and len(e["boxes"]) > 0
        for key in e:
            torch.testing.assert_close(a[key], e[key])
    targets = [{"boxes": torch.tensor([[10.0, 20, 200, 300]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[0.0, 0, 100, 100]]), "labels": torch.tensor([5])}]
    try:
        expected, actual = ours.train()(images, targets), scripted.train()(images, targets)
    finally:
        ours.eval(), scripted.eval()
    torch.testing.assert_close(actual, expected)


class ForwardBatch(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.forward_batch(batch)


def test_torch_export_of_forward_batch_matches_eager():
    model = randomize_batchnorm(heads.create_model("ssdlite320_mbv3_small_reduced", num_classes=5))
    batch = torch.rand(2, 3, 320, 320)
    exported = torch.export.export(ForwardBatch(model), (batch,)).module()
    with torch.no_grad():
        for actual, expected in zip(exported(batch), model.forward_batch(batch), strict=True):
            torch.testing.assert_close(actual, expected)


def test_norm_settings_reach_every_batchnorm():
    """torchvision's SSDLite BatchNorm (eps 1e-3, momentum 0.03) throughout, or the one given, backbone included."""
    def settings(model):
        return {(m.eps, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}

    assert settings(heads.create_model("ssdlite320_mbv3_small_reduced")) == {(1e-3, 0.03)}
    model = heads.create_model("ssdlite320_mbv3_small_reduced", norm_eps=1e-5, norm_momentum=0.1)
    assert settings(model) == {(1e-5, 0.1)}
    with pytest.raises(TypeError, match="bn_eps is timm's spelling of norm_eps; pass only norm_eps"):
        heads.create_model("ssdlite320_mbv3_small_reduced", bn_eps=1e-5)


def test_nms_keeps_exactly_torchvisions_detections():
    torch.manual_seed(1)
    xy, wh = torch.rand(20000, 2) * 300, torch.rand(20000, 2) * 80 + 1
    boxes, scores, labels = torch.cat([xy, xy + wh], 1), torch.rand(20000), torch.randint(1, 91, (20000,))
    assert torch.equal(greedy_nms(boxes, scores, labels, 0.55, 300), batched_nms(boxes, scores, labels, 0.55)[:300])


def test_pretrained_backbone_from_a_torchvision_imagenet_file(tmp_path):
    torch.save(mobilenet_v3_large().state_dict(), tmp_path / "backbone.pth")
    model = heads.create_model("ssdlite320_mbv3_large", pretrained_backbone=str(tmp_path / "backbone.pth"))
    expected = torch.load(tmp_path / "backbone.pth", weights_only=True)["features.0.0.weight"]
    assert torch.equal(model.backbone.model.stem.conv.weight, expected)


def test_errors_are_one_line(torchvision_pair, tmp_path):
    *_, path = torchvision_pair
    with pytest.raises(ValueError, match="Did you mean 'ssdlite320_mbv3_large'"):
        heads.create_model("ssdlite320_mbv3_larg")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pth"):
        heads.create_model("ssdlite320_mbv3_large_reduced", pretrained=str(tmp_path / "missing.pth"))
    with pytest.warns(UserWarning, match="classification layers are for another number of classes"):
        fine_tune = heads.create_model("ssdlite320_mbv3_large_reduced", num_classes=21, pretrained=str(path))
    torchvision = torch.load(path, weights_only=True)
    assert torch.equal(fine_tune.head.regression_head.module_list[0][1].weight,
                       torchvision["head.regression_head.module_list.0.1.weight"])
    with pytest.raises(CheckpointError, match="does not fit"):
        heads.create_model("ssdlite320_mbv3_small_reduced", pretrained=str(path))
    torch.save(mobilenet_v3_large().state_dict(), tmp_path / "classifier.pth")
    with pytest.raises(CheckpointError, match="not an SSDLite state dict"):
        heads.create_model("ssdlite320_mbv3_large_reduced", pretrained=str(tmp_path / "classifier.pth"))
    model = heads.create_model("ssdlite320_mbv3_small_reduced", num_classes=3)
    with pytest.raises(ValueError, match="3xHxW float"):
        model.eval()([torch.zeros(320, 320, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="degenerate box"):
        model.train()([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, 5, 5, 9]]), "labels": torch.tensor([1])}])


def _detections(*rows) -> dict:
    """Detections from (label, score, x1, y1, x2, y2) rows."""
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"labels": table[:, 0].long(), "scores": table[:, 1], "boxes": table[:, 2:]}


def test_detection_agreement_on_hand_made_cases():
    expected = _detections((1, 0.9, 0, 0, 100, 100), (2, 0.8, 50, 50, 150, 150))
    assert detection_agreement(expected, expected) == 1.0
    assert detection_agreement(_detections(), expected) == 1.0  # nothing expected
    # same boxes, the second under another label: half found
    assert detection_agreement(expected, _detections((1, 0.9, 0, 0, 100, 100), (3, 0.8, 50, 50, 150, 150))) == 0.5
    shifted = _detections((1, 0.9, 10, 0, 110, 100), (2, 0.8, 50, 50, 150, 150))  # IoU 90/110 = 0.818
    assert detection_agreement(expected, shifted, iou=0.8) == 1.0
    assert detection_agreement(expected, shifted, iou=0.85) == 0.5
    assert detection_agreement(expected, shifted, top=1, iou=0.85) == 0.0  # only the first counts
    swapped = _detections((2, 0.8, 50, 50, 150, 150), (1, 0.9, 0, 0, 100, 100))
    assert detection_agreement(expected, swapped, among=1) == 0.5  # only the other's first is searched
    # tolerance: score and coordinates (in 1000 px) within it
    nudged = _detections((1, 0.90005, 0.05, 0, 100, 100), (2, 0.8003, 50, 50, 150, 150))
    assert detection_agreement(expected, nudged, tolerance=1e-4) == 0.5
    assert detection_agreement(expected, nudged, tolerance=1e-3) == 1.0
    assert detection_agreement(expected, _detections((1, 0.9, 0.5, 0, 100, 100)), tolerance=1e-4) == 0.0  # 0.5 px
    assert same_detections(expected, swapped)  # in any order
    assert not same_detections(expected, _detections((1, 0.9, 0, 0, 100, 100)))  # one missing
