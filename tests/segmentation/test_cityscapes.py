"""Cityscapes reader, label tables and built-in set (augmentation: test_seg_augmentation.py)."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as official_labels
from conftest import REAL
from PIL import Image

from heads.data import DataError
from heads.segmentation.builtin import builtin_cityscapes
from heads.segmentation.cityscapes import (
    CATEGORIES,
    CLASS_NAMES,
    ID_TO_TRAIN_ID,
    PALETTE,
    TRAIN_ID_TO_ID,
    Cityscapes,
)
from heads.segmentation.transforms import SegTrainTransform

REAL_SAMPLE = REAL / "cityscapes_sample"
REAL_STEM = "frankfurt_000000_000294"


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return builtin_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes", num_train=4, num_val=3,
                              size=(96, 192))


def test_label_tables_match_official():
    evaluated = [label for label in official_labels if 0 <= label.trainId < 255]
    for label in official_labels:
        if label.id >= 0:
            assert ID_TO_TRAIN_ID[label.id] == (label.trainId if label in evaluated else 255), label.name
    assert (ID_TO_TRAIN_ID[34:] == 255).all()
    assert len(CLASS_NAMES) == len(CATEGORIES) == 19
    for label in evaluated:
        assert TRAIN_ID_TO_ID[label.trainId] == label.id
        assert CLASS_NAMES[label.trainId] == label.name
        assert CATEGORIES[label.trainId] == label.category
        assert tuple(PALETTE[label.trainId]) == label.color
    assert (ID_TO_TRAIN_ID[TRAIN_ID_TO_ID[:19]] == np.arange(19)).all()


def test_builtin_layout_and_labels(builtin):
    pattern = re.compile(r"(leftImg8bit|gtFine)/(train|val)/([a-z]+)/\3_000000_\d{6}_"
                         r"(leftImg8bit|gtFine_labelIds|gtFine_labelTrainIds|gtFine_color)\.png")
    files = sorted(str(p.relative_to(builtin)) for p in builtin.rglob("*.png"))
    assert len(files) == (4 + 3) * 4 and all(pattern.fullmatch(name) for name in files), files
    evaluated_ids = {label.id for label in official_labels if 0 <= label.trainId < 255}
    for label_path in builtin.glob("gtFine/*/*/*_gtFine_labelIds.png"):
        ids = np.asarray(Image.open(label_path))
        assert set(np.unique(ids)) <= evaluated_ids | {0} and (ids == 0).any() and (ids == 7).any()
        train_ids = np.asarray(Image.open(str(label_path).replace("labelIds", "labelTrainIds")))
        assert (train_ids == ID_TO_TRAIN_ID[ids]).all()
        colour = np.asarray(Image.open(str(label_path).replace("labelIds", "color")))
        assert (colour == PALETTE[train_ids]).all()


def test_builtin_is_written_once(builtin, tmp_path, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in builtin.rglob("*")}
    assert builtin_cityscapes(builtin, num_train=4, num_val=3, size=(96, 192)) == builtin
    assert {p: p.stat().st_mtime_ns for p in builtin.rglob("*")} == mtimes
    with pytest.raises(DataError, match="not the built-in Cityscapes set"):
        builtin_cityscapes(builtin, num_train=5, num_val=3, size=(96, 192))
    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path))
    root = builtin_cityscapes(num_train=1, num_val=1, size=(32, 64))
    assert root == tmp_path / "builtin_cityscapes" and os.listdir(tmp_path) == ["builtin_cityscapes"]


def test_dataset_items(builtin):
    dataset = Cityscapes(builtin, "val")
    assert len(dataset) == 3 and dataset.stems == [f"synthfurt_000000_{i:06d}" for i in range(3)]
    image, mask = dataset[0]
    assert image.shape == (3, 96, 192) and image.dtype == torch.uint8 and mask.shape == (96, 192)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= set(range(19)) | {255}
    raw_image, raw_mask = dataset.load(0)
    assert torch.equal(image, torch.tensor(raw_image).permute(2, 0, 1))
    assert (mask.numpy() == raw_mask).all()


def test_real_sample_loads_with_the_same_reader():
    dataset = Cityscapes(REAL_SAMPLE, split=None)
    assert dataset.stems == [REAL_STEM]
    image, mask = dataset[0]
    assert image.shape == (3, 128, 256) and mask.shape == (128, 256)
    shipped = np.asarray(Image.open(REAL_SAMPLE / "gtFine" / f"{REAL_STEM}_gtFine_labelTrainIds.png"))
    assert (mask.numpy() == shipped).mean() > 0.99


def test_test_split_without_labels_gives_ignore_masks(builtin, tmp_path):
    shutil.copytree(builtin / "leftImg8bit" / "val", tmp_path / "leftImg8bit" / "test")
    image, mask = Cityscapes(tmp_path, "test")[0]
    assert image.shape == (3, 96, 192) and (mask == 255).all()


def _copy_real_sample(tmp_path: Path) -> Path:
    shutil.copytree(REAL_SAMPLE / "leftImg8bit", tmp_path / "leftImg8bit")
    shutil.copytree(REAL_SAMPLE / "gtFine", tmp_path / "gtFine")
    return tmp_path / "gtFine" / f"{REAL_STEM}_gtFine_labelIds.png"


def test_errors_name_the_problem(builtin, tmp_path):
    with pytest.raises(DataError, match="root not found: .*nowhere"):
        Cityscapes(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"leftImg8bit/test.*expected leftImg8bit/<split>/<city>"):
        Cityscapes(builtin, "test")
    label = _copy_real_sample(tmp_path)
    Image.open(label).resize((128, 64), Image.NEAREST).save(label)
    with pytest.raises(DataError, match=f"{label}.*128x64.*256x128"):
        Cityscapes(tmp_path, split=None)[0]
    label.unlink()
    with pytest.raises(DataError, match=f"label file missing for .*{REAL_STEM}_leftImg8bit.png: expected {label}"):
        Cityscapes(tmp_path, split=None)


def test_dataset_with_augmentation_is_seeded(builtin):
    dataset = Cityscapes(builtin, "train", transform=SegTrainTransform(crop_size=(64, 128)))
    image, mask = dataset[(1, 123)]
    assert image.shape == (3, 64, 128) and mask.shape == (64, 128)
    again = dataset[(1, 123)]
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
