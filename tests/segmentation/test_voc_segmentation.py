"""Pascal VOC segmentation: ImageSets/Segmentation lists with their palette PNGs, in the 21-class label space of the
published LR-ASPP weights (the layout and the built-in set: tests/detection/test_voc_data.py)."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_batchnorm
from PIL import Image
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

from heads.data import DataError
from heads.segmentation.masks import MaskDataset
from heads.training.config import load_config
from heads.training.tasks import SegmentationTask
from heads.voc import SEGMENTATION_CLASSES, VOID, builtin_voc

PUBLISHED = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return builtin_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=30, num_val=10)


def test_masks_are_the_palette_indices_of_the_listed_ids(voc):
    dataset = MaskDataset.from_voc(voc, "train")
    listed = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert [path.stem for path in dataset.image_paths()] == listed and len(listed) < 30  # VOC segments a subset
    assert dataset.class_names == tuple(PUBLISHED.meta["categories"]) == SEGMENTATION_CLASSES
    values = set()
    for index, stem in enumerate(listed):
        image, mask = dataset[index]
        png = Image.open(voc / "SegmentationClass" / f"{stem}.png")
        assert png.mode == "P" and torch.equal(mask, torch.from_numpy(np.array(png)).long())
        assert image.shape[1:] == mask.shape and image.dtype == torch.uint8
        values |= set(mask.unique().tolist())
    assert VOID in values and {0, 1, 16, 20} & values and max(values - {VOID}) < 21


def test_the_config_reads_voc_segmentation_with_voc_splits(voc):
    cfg = load_config(None, dict(task="segmentation", dataset="voc", data_root=str(voc)))
    SegmentationTask.check(cfg)
    train, val = SegmentationTask.datasets(cfg)
    assert (len(train), len(val)) == tuple(len((voc / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split())
                                           for s in ("train", "val"))
    assert train.num_classes == 21 and train[0][1].shape == (cfg.crop_size[0], cfg.crop_size[1])  # augmented crops


def test_a_listed_id_without_its_mask_is_one_line(voc, tmp_path):
    stem = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (voc / "SegmentationClass" / f"{stem}.png").rename(tmp_path / "away.png")
    try:
        with pytest.raises(DataError, match="val.txt lists 1 id\\(s\\) without a file in .*SegmentationClass"):
            MaskDataset.from_voc(voc, "val")
    finally:
        (tmp_path / "away.png").rename(voc / "SegmentationClass" / f"{stem}.png")


def test_published_weights_fine_tune_on_voc_without_a_new_head(voc, tmp_path, monkeypatch):
    """The published lraspp_mbv3_large weights (torchvision's, from a local hub cache) take VOC's 21 classes as they
    are: no layer re-initialised, torchvision's logits."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    reference = randomize_batchnorm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21))
    torch.save(reference.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / Path(PUBLISHED.url).name)
    cfg = load_config(None, dict(task="segmentation", dataset="voc", data_root=str(voc), pretrained=True))
    train, _ = SegmentationTask.datasets(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a re-initialised head warns
        model = SegmentationTask.model(cfg, train).eval()
    assert model.meta["categories"] == list(SEGMENTATION_CLASSES)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(model.normalize(x)), reference.eval()(model.normalize(x))["out"],
                                   atol=1e-5, rtol=0)


def test_eval_tool_reads_the_voc_layout(voc, tmp_path):
    """tools/eval_seg.py --dataset voc scores VOC's val list under VOC's 21 class names."""
    from heads.cli import eval_seg_main

    model = SegmentationTask.model(load_config(None, dict(task="segmentation", dataset="voc", data_root=str(voc))),
                                   MaskDataset.from_voc(voc, "val"))
    torch.save({"model": model.state_dict(), "meta": model.meta}, tmp_path / "voc.pt")
    metrics = eval_seg_main(["--weights", str(tmp_path / "voc.pt"), "--model", "lraspp_mbv3_large",
                             "--dataset", "voc", "--data-root", str(voc), "--limit", "3"])
    assert list(metrics.per_class_iou) == list(SEGMENTATION_CLASSES)
