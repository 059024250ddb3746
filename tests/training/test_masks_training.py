"""Training on image and mask folders of your own classes (dataset: masks), as a user runs it: the config keys, the
one-line errors of bad input, metrics under the user's names and a Predictor on the run returning them."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import MASK_NAMES, write_masks_set
from PIL import Image

import heads
from heads.cli import eval_seg_main, train_main
from heads.deploy.predictor import Predictor
from heads.training.config import describe_fields

ROOT = Path(__file__).resolve().parents[2]
VOC_COLOURS = np.array([(0, 0, 0), (128, 0, 0), (0, 128, 0)])  # Pascal VOC's colours of labels 0, 1, 2
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(task="segmentation", model="lraspp_mbv3_small_reduced", crop_size=[32, 32], batch_size=2, workers=0,
             optimizer="adam", lr=0.001, lr_batch=2, warmup_steps=0, bn_recalibrate=2, tensorboard=False)


def _masks_data(root: Path) -> dict:
    """Train and val folders of 4 images each (32 x 48) and a classes file, as the config keys name them."""
    train = write_masks_set(root / "train", size=(32, 48), seed=0)
    val = write_masks_set(root / "val", size=(32, 48), seed=1)
    return dict(dataset="masks", train_images=str(train["images"]), train_masks=str(train["masks"]),
                val_images=str(val["images"]), val_masks=str(val["masks"]), classes=str(train["classes"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    return heads.train(dict(**SMALL, **_masks_data(folder / "data"), max_steps=30, eval_every=0,
                            output=str(folder / "run")))  # one evaluation: best.pt holds the weights it scored


def test_run_metrics_and_metadata_name_the_users_classes(run):
    assert set(run.metrics) == {"mIoU", "pixel_accuracy"}  # no Cityscapes categories
    metrics = yaml.safe_load((run.folder / "metrics.json").read_text())
    assert list(metrics["per_class_iou"]) == list(MASK_NAMES) and metrics["category_iou"] == {}
    assert all(name in (run.folder / "metrics.txt").read_text() for name in MASK_NAMES)
    meta = torch.load(run.best, map_location="cpu", weights_only=False)["meta"]
    assert meta["categories"] == list(MASK_NAMES) and meta["dataset_ids"] == [0, 1, 2] and meta["num_classes"] == 3


def test_predictor_on_the_run_returns_the_names_and_the_evaluated_masks(run, tmp_path):
    """The run's evaluation (metrics.json) equals scikit-learn's IoU of the Predictor's masks against the mask files
    read by Pillow; the pictures paint classes in Pascal VOC's colours."""
    from sklearn.metrics import jaccard_score

    config = yaml.safe_load((run.folder / "config.yaml").read_text())
    images = sorted(Path(config["val_images"]).iterdir())
    predictor = Predictor(run.folder, fuse=False, batch_size=1)
    results = predictor(images, out=tmp_path)
    predicted, truth = [], []
    for image, result in zip(images, results):
        assert result.categories == list(MASK_NAMES) and result.mask.dtype == np.uint8
        assert result.mask.shape == (32, 48) and result.mask.max() < 3
        written = np.asarray(Image.open(tmp_path / f"{image.stem}_labelIds.png"))
        assert (written == result.mask).all()  # the class ids are the mask values of this dataset
        expected = np.round(0.5 * result.image + 0.5 * VOC_COLOURS[result.mask])
        assert (result.plot() == expected).all()
        gt = np.asarray(Image.open(Path(config["val_masks"]) / f"{image.stem}.png"))
        predicted.append(result.mask[gt != 255])
        truth.append(gt[gt != 255])
    reference = jaccard_score(np.concatenate(truth), np.concatenate(predicted), labels=[0, 1, 2], average=None)
    evaluated = yaml.safe_load((run.folder / "metrics.json").read_text())["per_class_iou"]
    assert np.allclose(list(evaluated.values()), reference, rtol=0, atol=1e-12) and len(set(reference)) == 3


def test_config_documents_the_masks_keys():
    fields = describe_fields()
    for key in ("train_masks", "val_masks", "classes"):
        assert f"--{key} " in fields
    assert "masks: each image pairs with the same-stem PNG of train_masks" in fields


def test_placeholder_config_names_the_folder_to_set(tmp_path, monkeypatch, capsys):
    """configs/lraspp_mbv3_large_masks.yaml holds placeholders: run as it is, it names the first folder to set."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train_main(["--config", str(ROOT / "configs" / "lraspp_mbv3_large_masks.yaml")], task="segmentation")
    error = capsys.readouterr().err
    assert error == "error: train_images: image folder data/my_masks/images/train not found\n"


def _break(data: dict, case: str) -> dict:
    """``data`` (the config keys of a good masks set) with one mistake; returns the overrides to pass."""
    train_masks, val_images = Path(data["train_masks"]), Path(data["val_images"])
    if case == "value":
        for mask in train_masks.iterdir():
            ids = np.asarray(Image.open(mask)).copy()
            ids[2:4, 2:4] = [[7, 254], [3, 3]]
            Image.fromarray(ids).save(mask)
    elif case == "size":
        for mask in train_masks.iterdir():
            Image.open(mask).resize((24, 16), Image.NEAREST).save(mask)
    elif case == "no mask":
        (train_masks / "frame_002.png").unlink()
    elif case == "no image":
        (val_images / "frame_003.jpg").unlink()
    elif case == "empty folder":
        shutil.rmtree(val_images)
        val_images.mkdir()
    elif case == "empty classes":
        Path(data["classes"]).write_text("\n")
    return {}


@pytest.mark.parametrize("case, overrides, message", [
    ("value", [], "error: mask {train_masks}/frame_00*.png holds values [3, 7, 254] that are no class id: 3 classes "
                  "(background, lane, curb) take ids 0..2, and 255 marks pixels to ignore"),
    ("size", [], "error: mask {train_masks}/frame_00* is 24x16 but its image {train_images}/frame_00*.png is 48x32 "
                 "(width x height)"),
    ("no mask", [], "error: image {train_images}/frame_002.png has no mask: expected frame_002.png in {train_masks} "
                    "(train_masks)"),
    ("no image", [], "error: mask {val_masks}/frame_003.png has no image: expected frame_003 with one of .jpg, .jpeg, "
                     ".png, .bmp, .webp, .tif, .tiff in {val_images} (val_images)"),
    ("missing folder", ["--val_masks", "{tmp}/nowhere"], "error: val_masks: PNG mask folder {tmp}/nowhere not found"),
    ("empty folder", [], "error: val_images: no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff) in "
                         "{val_images}"),
    ("empty classes", [], "error: classes file {classes}: 0 class names; a segmenter needs at least two"),
    ("classes folder", ["--classes", "{tmp}"], "error: classes file {tmp} cannot be read as UTF-8 text: a folder"),
    ("duplicate names", ["--classes", "[road, lane, road]"], "error: classes: 'road' is named twice (ids 0 and 2)"),
    ("yaml boolean", ["--classes", "[road, on]"], "error: command line: classes must be a list of names (quote those "
                                                  "YAML reads as numbers or booleans: '1', 'yes', 'on')"),
    ("missing key", ["--val_masks", "null"], "error: dataset: masks needs train_images, train_masks, val_images, "
                                             "val_masks and classes; missing: val_masks"),
    ("data_root", ["--data_root", "/data/x"], "error: data_root is /data/x but dataset: masks reads train_images"),
    ("builtin_masks", ["--dataset", "builtin_masks", "--data_root", "/data/x", "--train_images", "null",
                       "--train_masks", "null", "--val_images", "null", "--val_masks", "null", "--classes", "null"],
     "error: data_root is /data/x but dataset is builtin_masks, which is generated under $MBBACKBONES_DATA; to "
     "train on /data/x, set dataset: masks (train_images, train_masks, val_images, val_masks and classes)"),
    ("cityscapes", ["--dataset", "cityscapes", "--data_root", "/data/x"],
     "error: train_images, train_masks, val_images, val_masks, classes: read by dataset: masks only, but dataset is "
     "cityscapes; set dataset: masks or remove them"),
])
def test_bad_masks_input_is_one_line(case, overrides, message, tmp_path, capsys):
    data = _masks_data(tmp_path / "data")
    _break(data, case)
    config = tmp_path / "masks.yaml"
    config.write_text(yaml.safe_dump({**SMALL, **data, "max_steps": 1}))
    words = {"tmp": tmp_path, **data}
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(config), *[word.format(**words) for word in overrides], "--output",
                    str(tmp_path / "run")], task="segmentation")
    error = capsys.readouterr().err  # after training's progress bar when a sample's file is at fault
    line = error[error.index("error: "):]
    assert exit_info.value.code == 2 and line.count("\n") == 1, error
    expected = message.format(**words).split("*")  # * stands for the number of the first sample read
    assert line.startswith(expected[0]) and all(part in line for part in expected[1:]), error


def test_eval_tool_scores_the_run_on_its_layout(run, tmp_path):
    """tools/eval_seg.py on a masks run reads the masks layout (images/<split>, masks/<split>, classes.txt) and gives
    the run's own evaluation."""
    config = yaml.safe_load((run.folder / "config.yaml").read_text())
    for folder, source in (("images", config["val_images"]), ("masks", config["val_masks"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "val").symlink_to(source)
    (tmp_path / "classes.txt").symlink_to(config["classes"])
    metrics = eval_seg_main(["--weights", str(run.folder), "--data-root", str(tmp_path)])
    evaluated = yaml.safe_load((run.folder / "metrics.json").read_text())
    assert metrics.per_class_iou == pytest.approx(evaluated["per_class_iou"], abs=1e-9)
    assert list(metrics.per_class_iou) == list(MASK_NAMES)
