"""Image and mask folders of your own classes: the reader, its errors, the built-in masks set, colours, metrics.
(Training on them, the tools and the Predictor: tests/training/test_masks_training.py.)"""
import math
import os

import numpy as np
import pytest
import torch
from conftest import MASK_NAMES as NAMES
from conftest import write_masks_set
from PIL import Image
from torch import nn

from heads.data import DataError
from heads.segmentation.builtin import MASK_CLASSES, builtin_masks
from heads.segmentation.cityscapes import CLASS_NAMES, PALETTE
from heads.segmentation.evaluate import ConfusionMatrix, evaluate_model
from heads.segmentation.masks import MaskDataset, pair_by_stem, read_classes
from heads.segmentation.transforms import SegTrainTransform
from heads.training.tasks import SegmentationTask
from heads.visualize import class_palette
from heads.voc import palette

# Pascal VOC's colours of its 21 classes and of its border value 255 (the devkit's VOClabelcolormap), written out
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
               (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128)]
VOC_BORDER = (224, 224, 192)


@pytest.fixture
def masks_set(tmp_path) -> dict:
    return write_masks_set(tmp_path / "set")


def _dataset(found: dict, **kwargs) -> MaskDataset:
    return MaskDataset.from_folders(found["images"], found["masks"], found["classes"], **kwargs)


def test_palette_pngs_read_as_their_indices_and_ignore_is_kept(masks_set):
    assert Image.open(masks_set["masks"] / "frame_000.png").mode == "P"
    assert Image.open(masks_set["masks"] / "frame_001.png").mode == "L"
    dataset = _dataset(masks_set)
    assert dataset.class_names == NAMES and dataset.num_classes == 3 and dataset.dataset_ids == [0, 1, 2]
    assert dataset.categories == () and dataset.stems == [f"frame_{i:03d}" for i in range(4)]
    for index, stem in enumerate(dataset.stems):
        image, mask = dataset[index]
        assert mask.dtype == torch.int64 and (mask.numpy() == masks_set["ids"][stem]).all()
        assert (mask == 255).sum() == 5
        with Image.open(dataset.files[index][0]) as decoded:  # JPEG or PNG, decoded by Pillow
            assert image.dtype == torch.uint8 and (image.permute(1, 2, 0).numpy() == np.asarray(decoded)).all()


def test_pairs_by_stem_whatever_the_image_suffix(masks_set):
    (masks_set["images"] / "notes.txt").write_text("not an image")
    (masks_set["images"] / ".hidden.png").write_bytes(b"")
    (masks_set["masks"] / "readme.md").write_text("not a mask")
    pairs = pair_by_stem(masks_set["images"], masks_set["masks"])
    assert [(image.name, mask.name) for image, mask in pairs] == [
        ("frame_000.png", "frame_000.png"), ("frame_001.jpg", "frame_001.png"),
        ("frame_002.png", "frame_002.png"), ("frame_003.jpg", "frame_003.png")]


def test_augmented_items_are_seeded_and_keep_class_ids(masks_set):
    dataset = _dataset(masks_set, transform=SegTrainTransform(crop_size=(16, 16)))
    image, mask = dataset[(1, 7)]
    again = dataset[(1, 7)]
    assert image.shape == (3, 16, 16) and torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}


def test_classes_from_a_list_or_a_file(tmp_path):
    assert read_classes(["sky", "lane"]) == ("sky", "lane")
    file = tmp_path / "classes.txt"
    file.write_bytes("\ufeffbackground\r\n  lane \nStraße\n\n\n".encode())  # BOM, CRLF, spaces, trailing blanks
    assert read_classes(file) == read_classes(str(file)) == ("background", "lane", "Straße")


@pytest.mark.parametrize("content, message", [
    (b"", ": 0 class names; a segmenter needs at least two"),
    (b"\n\n", ": 0 class names"),
    (b"background\n", ": 1 class name; a segmenter needs at least two"),
    (b"background\n\nlane\n", "line 2 is empty"),
    (b"background\nlane\ndisk\nlane\n", "'lane' is named twice (lines 2 and 4)"),
    (b"\xff\xfe\x00b\x00", "cannot be read as UTF-8 text"),
    ("".join(f"c{i}\n" for i in range(256)).encode(), ": 256 class names; masks hold at most 255"),
])
def test_bad_classes_files_are_one_line(tmp_path, content, message):
    file = tmp_path / "classes.txt"
    file.write_bytes(content)
    with pytest.raises(DataError, match=f"^classes file {file}") as raised:
        read_classes(file)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_bad_class_lists_and_missing_or_folder_classes_files(tmp_path):
    with pytest.raises(DataError, match=r"^classes: 'a' is named twice \(ids 0 and 2\)"):
        read_classes(["a", "b", "a"])
    with pytest.raises(DataError, match=r"^classes: id 1 is empty"):
        read_classes(["a", " "])
    with pytest.raises(DataError, match=r"^classes: class names must be strings, got \['a', True\]"):
        read_classes(["a", True])
    with pytest.raises(DataError, match=f"^classes file not found: {tmp_path / 'nowhere.txt'}"):
        read_classes(tmp_path / "nowhere.txt")
    with pytest.raises(DataError, match=f"^classes file {tmp_path} cannot be read as UTF-8 text: a folder$"):
        read_classes(tmp_path)


def test_mask_values_outside_the_classes_name_the_file_and_values(masks_set):
    path = masks_set["masks"] / "frame_002.png"
    ids = masks_set["ids"]["frame_002"].copy()
    ids[3, 3], ids[4, 4], ids[5, 5] = 3, 9, 254
    Image.fromarray(ids).save(path)
    dataset = _dataset(masks_set)
    with pytest.raises(DataError, match=rf"^mask {path} holds values \[3, 9, 254\] that are no class id: 3 classes "
                                        r"\(background, lane, curb\) take ids 0\.\.2, and 255 marks pixels to "
                                        "ignore$"):
        dataset[2]
    wide = ids.astype(np.uint16)
    wide[6, 6] = 1000
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I;16")
    with pytest.raises(DataError, match=r"holds values \[3, 9, 254, 1000\]"):
        dataset.load(2)


def test_colour_masks_and_size_mismatches_name_the_file(masks_set):
    path = masks_set["masks"] / "frame_001.png"
    Image.fromarray(palette()[masks_set["ids"]["frame_001"]]).save(path)  # an RGB colour mask
    dataset = _dataset(masks_set)
    with pytest.raises(DataError, match=rf"^mask {path} must be a single-channel PNG of class ids, got shape "
                                        r"\(24, 32, 3\) uint8 \(colours: save the ids as a grayscale or palette PNG\)"):
        dataset[1]
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(path)
    image = masks_set["images"] / "frame_001.jpg"
    with pytest.raises(DataError, match=rf"^mask {path} is 30x20 but its image {image} is 32x24 \(width x height\)$"):
        dataset[1]


def test_unpaired_files_name_the_file_and_the_folder_searched(masks_set):
    images, masks = masks_set["images"], masks_set["masks"]
    (masks / "frame_003.png").unlink()
    with pytest.raises(DataError, match=rf"^image {images / 'frame_003.jpg'} has no mask: expected frame_003\.png in "
                                        rf"{masks} \(val_masks\)$"):
        pair_by_stem(images, masks, keys=("val_images", "val_masks"))
    (images / "frame_003.jpg").unlink()
    (images / "frame_000.png").unlink()
    with pytest.raises(DataError, match=rf"^mask {masks / 'frame_000.png'} has no image: expected frame_000 with one "
                                        rf"of \.jpg, .* in {images} \(images\)$"):
        pair_by_stem(images, masks)
    Image.new("RGB", (32, 24)).save(images / "frame_001.png")  # beside frame_001.jpg
    with pytest.raises(DataError, match=r"^images: frame_001\.jpg and frame_001\.png in .* share the stem "
                                        "'frame_001'; images and masks pair by stem"):
        pair_by_stem(images, masks)


def test_missing_empty_or_shared_folders(masks_set, tmp_path):
    images, masks = masks_set["images"], masks_set["masks"]
    with pytest.raises(DataError, match=f"^train_images: image folder {tmp_path / 'nowhere'} not found$"):
        pair_by_stem(tmp_path / "nowhere", masks, keys=("train_images", "train_masks"))
    with pytest.raises(DataError, match=f"^masks: PNG mask folder {masks_set['classes']} is a file, not a folder$"):
        pair_by_stem(images, masks_set["classes"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"^masks: no PNG masks \(\.png\) in {tmp_path / 'empty'}$"):
        pair_by_stem(images, tmp_path / "empty")
    with pytest.raises(DataError, match=r"^images: no images \(\.jpg, \.jpeg, \.png"):
        pair_by_stem(tmp_path / "empty", masks)
    with pytest.raises(DataError, match=f"^images and masks are the same folder {images}"):
        pair_by_stem(images, images)


def test_builtin_masks_layout(tmp_path):
    root = builtin_masks(tmp_path / "bm", num_train=10, num_val=5, size_range=(48, 64))
    assert (root / "classes.txt").read_text() == "background\ndisk\nstripe\n" and MASK_CLASSES == read_classes(
        root / "classes.txt")
    for split, count in (("train", 10), ("val", 5)):
        dataset = MaskDataset.from_folders(root / "images" / split, root / "masks" / split, root / "classes.txt")
        assert len(dataset) == count
        suffixes = {image.suffix for image, _ in dataset.files}
        modes = {Image.open(mask).mode for _, mask in dataset.files}
        assert suffixes == {".jpg", ".png"} and modes == {"P", "L"}
        values = np.concatenate([dataset.load(i)[1].ravel() for i in range(count)])
        assert set(np.unique(values).tolist()) == {0, 1, 2, 255}
        assert {dataset.load(i)[0].shape[:2] for i in range(count)} <= {(h, w) for h in range(48, 65)
                                                                         for w in range(48, 65)}
    palette_mask = next(mask for _, mask in dataset.files if Image.open(mask).mode == "P")
    assert (np.array(Image.open(palette_mask).getpalette()).reshape(-1, 3) == palette()).all()


def test_builtin_masks_rings_of_ignore_surround_disks_only(tmp_path):
    root = builtin_masks(tmp_path / "bm", num_train=6, num_val=1, size_range=(64, 64))
    dataset = MaskDataset.from_folders(root / "images" / "train", root / "masks" / "train", MASK_CLASSES)
    for index in range(len(dataset)):
        mask = dataset.load(index)[1]
        padded = np.pad(mask, 4, mode="edge")
        near = np.stack([padded[4 + dy:68 + dy, 4 + dx:68 + dx] for dy in range(-4, 5) for dx in range(-4, 5)])
        assert (near[:, mask == 255] == 1).any(0).all()  # thin rings (two of them: 4 pixels) beside disks


def test_builtin_masks_written_once_and_checked(tmp_path, monkeypatch):
    root = builtin_masks(tmp_path / "bm", num_train=2, num_val=1, size_range=(32, 40))
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert builtin_masks(root, num_train=2, num_val=1, size_range=(32, 40)) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    with pytest.raises(DataError, match="exists but is not the built-in masks set for these arguments"):
        builtin_masks(root, num_train=3, num_val=1, size_range=(32, 40))
    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path / "home"))
    assert builtin_masks(num_train=1, num_val=1, size_range=(32, 32)) == tmp_path / "home" / "builtin_masks"
    assert os.listdir(tmp_path / "home") == ["builtin_masks"]


def test_segmentation_colours_are_cityscapes_own_else_pascal_vocs():
    assert class_palette(CLASS_NAMES) is PALETTE
    colours = class_palette(NAMES)
    assert [tuple(c) for c in colours[:21].tolist()] == VOC_COLOURS and tuple(colours[255]) == VOC_BORDER


def test_confusion_under_the_users_names_equals_sklearn():
    """A hand-made case: IoU per class by hand, and scikit-learn's jaccard_score as a second reference."""
    from sklearn.metrics import jaccard_score

    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    confusion = ConfusionMatrix(NAMES, categories=())
    confusion.update(pred, target)
    metrics = confusion.compute()
    # background: 2 hits / (3 GT + 3 predicted - 2); lane 1 / (2 + 2 - 1); curb 2 / (3 + 3 - 2)
    assert metrics.per_class_iou == {"background": 0.5, "lane": pytest.approx(1 / 3), "curb": 0.5}
    kept = target != 255
    reference = jaccard_score(target[kept].numpy(), pred[kept].numpy(), labels=[0, 1, 2], average=None)
    assert np.allclose(list(metrics.per_class_iou.values()), reference)
    assert metrics.category_iou == {} and math.isnan(metrics.category_miou)
    table = metrics.table()
    assert "lane" in table and "category" not in table


class _Constant(nn.Module):
    """A stand-in segmenter: the ground truth's class ids of one image as logits, whatever the input."""

    def __init__(self, mask: np.ndarray, num_classes: int):
        super().__init__()
        logits = torch.nn.functional.one_hot(torch.from_numpy(mask.astype(np.int64)).clamp(max=num_classes - 1),
                                             num_classes).permute(2, 0, 1).float()
        self.register_buffer("logits", logits[None])

    def normalize(self, images):
        return images.float()

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1, -1, -1)

    def forward_batch(self, images):
        return (self(images),)


def test_evaluation_and_pictures_use_the_datasets_names_and_colours(masks_set, tmp_path):
    dataset = _dataset(masks_set)
    model = _Constant(dataset.load(0)[1], 3)
    metrics = evaluate_model(model, dataset, "cpu", limit=1, output=tmp_path)
    assert list(metrics.per_class_iou) == list(NAMES) and metrics.miou == 1.0 and metrics.category_iou == {}
    assert "curb" in (tmp_path / "metrics.txt").read_text() and (tmp_path / "confusion.png").stat().st_size > 0
    image, mask = dataset.load(0)
    picture = SegmentationTask.pictures(model, dataset, "cpu")[0]
    predicted = np.minimum(mask, 2)  # the stand-in predicts curb where the ground truth is ignore
    expected = np.round(0.5 * image + 0.5 * np.array([(0, 0, 0), (128, 0, 0), (0, 128, 0)])[predicted])
    assert (picture == expected).all()
