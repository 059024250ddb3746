"""Task models by name: published weights through torch's hub cache (offline), their metadata, and their errors."""
from functools import partial
from pathlib import Path

import pytest
import torch
from benchmarking.workloads import calibrated_torchvision_detector
from conftest import randomize_batchnorm
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights, ssdlite320_mobilenet_v3_large
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

import heads
from heads.data import read_image
from mbbackbones.checkpoint import WeightsUnavailable

DETECTOR, SEGMENTER = "ssdlite320_mbv3_large_reduced", "lraspp_mbv3_large"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache ($TORCH_HOME); files saved under published names stand for the downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def photos():
    return [torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float() / 255
            for path in heads.SAMPLE_IMAGES.values()]


def test_published_detector_loads_from_the_cache_and_gives_torchvisions_detections(hub):
    torch.manual_seed(0)
    images = photos()
    reference = calibrated_torchvision_detector(images).eval()
    torch.save(reference.state_dict(), hub / Path(SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url).name)
    model = heads.create_model(DETECTOR, pretrained=True).eval()
    assert model.num_classes == 91  # the file's, not the default
    assert model.meta["categories"] == SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    assert model.meta["metrics"] == {"COCO-val2017": {"box_map": 21.3}} and model.meta["dataset_ids"][1] == 1
    with torch.no_grad():
        expected, actual = reference(images), model(images)
    for e, a in zip(expected, actual):
        assert len(a["boxes"]) == len(e["boxes"]) > 0
        torch.testing.assert_close(a["scores"].sort().values, e["scores"].sort().values, atol=1e-5, rtol=0)
    assert heads.create_model(DETECTOR, pretrained="coco_v1").meta == model.meta  # the tag, same file


def test_published_segmenter_keeps_its_21_classes_and_gives_torchvisions_logits(hub):
    reference = randomize_batchnorm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21))
    torch.save(reference.state_dict(), hub / Path(LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.url).name)
    model = heads.create_model(SEGMENTER, pretrained=True).eval()
    assert model.num_classes == 21 != heads.create_model(SEGMENTER).num_classes
    assert model.meta["categories"][15] == "person" and model.meta["resize"] == 520
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(model.normalize(x)), reference(model.normalize(x))["out"], atol=1e-5,
                                   rtol=0)


def test_pretrained_backbone_true_loads_the_imagenet_file_from_the_cache(hub):
    imagenet = mobilenet_v3_large()
    torch.save(imagenet.state_dict(), hub / "mobilenet_v3_large-5c1a4163.pth")
    model = heads.create_model(SEGMENTER, pretrained_backbone=True)
    stem = model.backbone.model.stem.conv.weight
    assert torch.equal(stem, imagenet.features[0][0].weight)


def test_offline_without_the_file_says_which_file_where_and_the_alternative(hub):
    with pytest.raises(WeightsUnavailable) as error:
        heads.create_model(DETECTOR, pretrained=True)
    message = str(error.value)
    assert "ssdlite320_mobilenet_v3_large_coco-a79551df.pth" in message and str(hub) in message
    assert "pretrained=PATH" in message and "\n" not in message
    with pytest.raises(WeightsUnavailable, match="mobilenet_v3_large-5c1a4163.pth are not in .*pretrained_backbone="):
        heads.create_model(SEGMENTER, pretrained_backbone=True)
    with pytest.raises(WeightsUnavailable, match="ssdlite320_mbv3_large has no published weights.*pretrained=PATH"):
        heads.create_model("ssdlite320_mbv3_large", pretrained=True)
    with pytest.raises(ValueError, match="'coco' is neither a published weights tag \\(tags: coco_v1\\) nor a file"):
        heads.create_model(DETECTOR, pretrained="coco")
    with pytest.raises(ValueError, match="pretrained and pretrained_backbone together"):
        heads.create_model(DETECTOR, pretrained=True, pretrained_backbone=True)


def test_a_model_that_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(heads.create_model(DETECTOR, num_classes=6, extra_channels=(512, 256, 256, 64)).state_dict(), path)
    with pytest.raises(ValueError, match=r"other.pth does not fit: extra\.3\.0\.conv\.weight is \(32, 256, 1, 1\) in "
                                         r"the checkpoint but \(64, 256, 1, 1\) in the model$"):
        heads.create_model(DETECTOR, num_classes=6, pretrained=path)


def test_every_model_describes_itself_as_data():
    for name in heads.list_models():
        meta = heads.create_model(name).meta
        assert meta["name"] == name and meta["task"] in ("detection", "segmentation")
        assert len(meta["categories"]) == meta["num_classes"] and len(meta["mean"]) == len(meta["std"]) == 3
        assert set(meta) >= {"input_size", "resize", "metrics", "recipe", "weights", "dataset_ids"}
    assert heads.list_models(pretrained=True) == [DETECTOR, SEGMENTER]
    assert heads.list_weights(DETECTOR) == ["coco_v1"]


@pytest.mark.parametrize("name, torchvision_model, layers, message", [
    (DETECTOR, partial(ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None),
     {f"head.classification_head.module_list.{i}.1" for i in range(6)},
     r"head\.classification_head\.module_list\.\{0,1,2,3,4,5\}\.1"),
    (SEGMENTER, partial(lraspp_mobilenet_v3_large, weights=None, weights_backbone=None, num_classes=21),
     {"head.low_classifier", "head.high_classifier"}, "head.low_classifier, head.high_classifier")],
    ids=["detection", "segmentation"])
def test_a_new_head_from_published_weights_or_a_file_names_the_layers_it_reinitialises(name, torchvision_model,
                                                                                       layers, message, hub, tmp_path):
    file = next(iter(heads.ENTRIES[name].weights.values())).file
    torch.save(torchvision_model().state_dict(), hub / file)
    published = heads.create_model(name, pretrained=True).state_dict()
    torch.save(published, tmp_path / "mine.pth")
    for source, pretrained in ((file, True), ("mine.pth", tmp_path / "mine.pth")):
        with pytest.warns(UserWarning, match=rf"{name}: .*{source}: .* the model's 4-class layers start untrained "
                                             rf"\(re-initialised: {message}\)$"):
            model = heads.create_model(name, num_classes=4, pretrained=pretrained)
        state = model.state_dict()
        fresh = {key for key, value in state.items() if value.shape != published[key].shape}
        assert {key.rsplit(".", 1)[0] for key in fresh} == layers
        assert all(torch.equal(value, published[key]) for key, value in state.items() if key not in fresh)
