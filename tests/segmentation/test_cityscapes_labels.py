"""Cityscapes label files: ids outside the official table stop with the file's name; 16-bit PNGs are read as
cityscapesScripts reads them (numpy values as stored), so those within the table are accepted."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heads.data import DataError
from heads.segmentation.builtin import builtin_cityscapes
from heads.segmentation.cityscapes import ID_TO_TRAIN_ID, Cityscapes


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return builtin_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes", num_train=1, num_val=2, size=(48, 96))


@pytest.fixture
def copy(builtin, tmp_path) -> tuple[Cityscapes, Path, np.ndarray]:
    """A copy of the built-in val split, its first label file and that file's label ids."""
    shutil.copytree(builtin, tmp_path / "cityscapes")
    dataset = Cityscapes(tmp_path / "cityscapes", "val")
    label = dataset.files[0][1]
    return dataset, label, np.asarray(Image.open(label))


@pytest.mark.parametrize("unknown", [34, 200, 255])
def test_ground_truth_id_outside_the_table_names_the_file(copy, unknown):
    """Before, an unknown id became 'ignore', so a broken label file could score mIoU 100."""
    dataset, label, ids = copy
    ids = ids.copy()
    ids[3:5, 10:20] = unknown
    Image.fromarray(ids).save(label)
    with pytest.raises(DataError, match=f"{label} holds label ids \\[{unknown}\\] outside the Cityscapes label "
                                        r"table \(0\.\.33\)"):
        dataset[0]


def test_16_bit_ground_truth_within_the_table_reads_as_8_bit(copy):
    dataset, label, ids = copy
    expected = dataset.load(0)[1]
    Image.fromarray(ids.astype(np.uint16)).save(label)
    assert Image.open(label).mode == "I;16"
    assert (dataset.load(0)[1] == expected).all() and (expected == ID_TO_TRAIN_ID[ids]).all()
    Image.fromarray(ids.astype(np.uint16) + 1000).save(label)
    with pytest.raises(DataError, match=f"{label} holds label ids .*outside the Cityscapes label table"):
        dataset.load(0)


def test_multi_channel_label_file_is_refused(copy):
    dataset, label, ids = copy
    Image.fromarray(np.stack([ids] * 3, axis=-1)).save(label)
    with pytest.raises(DataError, match=f"{label} must be a single-channel PNG of label ids, got shape"):
        dataset.load(0)
