"""Bad VOC input: each error is one line naming the file (or config key) and the fix."""
import shutil
from pathlib import Path

import pytest
from PIL import Image

from heads.data import DataError
from heads.detection.voc import VocDetection
from heads.training.config import ConfigError, load_config
from heads.training.tasks import DetectionTask
from heads.voc import split_ids

GOOD_OBJECT = ("<object><name>dog</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>"
               "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>")


def write_voc(root: Path, objects: str = GOOD_OBJECT, size=(64, 48), image_size=(64, 48), ids=("2007_000001",)):
    """A VOC folder with one annotated image per id (``objects``: the XML inside <annotation> after <size>)."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        Image.new("RGB", image_size, (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def one_line_error(root: Path, match: str, split: str = "train", **kwargs) -> str:
    with pytest.raises(DataError, match=match) as error:
        VocDetection(root, split, **kwargs)[0]
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_good_case_reads(tmp_path):
    _, target = VocDetection(write_voc(tmp_path / "voc"), "train")[0]
    assert target["boxes"].tolist() == [[0, 1, 40, 30]] and target["labels"].tolist() == [12]  # dog


# ---- the folder and its lists


def test_missing_folder_names_the_layout(tmp_path):
    message = one_line_error(tmp_path / "VOC2012", "VOC folder not found")
    assert "VOC2012 or VOC2007 folder" in message and "JPEGImages/, Annotations/, ImageSets/" in message


def test_missing_list_names_the_splits_there(tmp_path):
    root = write_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "val.txt").write_text("2007_000001\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("2007_000001  1\n")  # per-class lists are not splits
    message = one_line_error(root, r"split list not found: .*ImageSets/Main/train2017\.txt", split="train2017")
    assert message.endswith("the splits there: train, val (set train_split / val_split to one)")
    shutil.rmtree(root / "ImageSets")
    assert "has no split lists" in one_line_error(root, "split list not found")


def test_empty_list_and_repeated_ids(tmp_path):
    root = write_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n\n")
    one_line_error(root, r"train\.txt lists no image ids; write one id a line")
    (root / "ImageSets" / "Main" / "train.txt").write_text("2007_000001\n2007_000001\n")
    one_line_error(root, r"train\.txt lists 2007_000001 more than once")


@pytest.mark.parametrize("folder, suffix", [("JPEGImages", ".jpg"), ("Annotations", ".xml")])
def test_listed_id_without_its_file(tmp_path, folder, suffix):
    root = write_voc(tmp_path / "voc", ids=("2007_000001", "2007_000002"))
    (root / folder / f"2007_000002{suffix}").unlink()
    message = one_line_error(root, rf"train\.txt lists 1 id\(s\) without a file in .*{folder}, first 2007_000002")
    assert f"(no 2007_000002{suffix})" in message and "remove the ids from the list" in message
    assert split_ids(root, "Main", "train", {}) == ["2007_000001", "2007_000002"]


# ---- the XML


@pytest.mark.parametrize("annotation, match", [
    ("<annotation><size>", r"2007_000001\.xml: malformed XML \(.*\); fix the file or extract it again"),
    ("<coco/>", r"not a VOC annotation \(the root element is <coco>"),
    ("<annotation><object/></annotation>", r"the image has no <size><width>; a VOC annotation gives it"),
    ("<annotation><size><width>64.5</width><height>48</height></size></annotation>",
     r"the image has <size><width> '64.5', not a positive integer"),
    ("<annotation><size><width>64</width><height>0</height></size></annotation>",
     r"the image has <size><height> '0', not a positive integer"),
])
def test_malformed_files(tmp_path, annotation, match):
    root = write_voc(tmp_path / "voc")
    (root / "Annotations" / "2007_000001.xml").write_text(annotation)
    one_line_error(root, match)


def box(xmin, ymin, xmax, ymax, name="dog", difficult="0"):
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


@pytest.mark.parametrize("objects, match", [
    (box(1, 1, 9, 9, name="dogg"), r"object 0 is named 'dogg', not one of VOC's 20 classes\. Did you mean 'dog'\? "
                                    r"Fix the name \(classes: aeroplane, bicycle"),
    ("<object><pose>Left</pose></object>", r"object 0 has no <name>"),
    (GOOD_OBJECT + box(1, 1, 9, 9, difficult="yes"), r"object 1 \(dog\) has <difficult> 'yes'; it must be 0 or 1"),
    ("<object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object>", r"object 0 \(cat\) has no <bndbox><ymin>"),
    (box(1, "a", 9, 9), r"object 0 \(dog\) has <bndbox><ymin> 'a', not a number"),
    (box(1, 1, "nan", 9), r"object 0 \(dog\) has <bndbox><xmax> 'nan', not a number"),
    (box(10, 1, 9, 9), r"object 0 \(dog\) has an empty box \(xmin 10, ymin 1, xmax 9, ymax 9\): xmax must be >= xmin"),
    (box(0, 1, 9, 9), r"object 0 \(dog\) has a box \(xmin 0, .*\) outside its 64x48 image; VOC boxes run from pixel "
                      r"1 to the width and height: fix the coordinates"),
    (box(1, 1, 9, 48.5), r"box \(xmin 1, ymin 1, xmax 9, ymax 48\.5\) outside its 64x48 image"),
])
def test_bad_objects(tmp_path, objects, match):
    message = one_line_error(write_voc(tmp_path / "voc", objects), match)
    assert "2007_000001.xml" in message


def test_a_one_pixel_box_is_a_box(tmp_path):
    _, target = VocDetection(write_voc(tmp_path / "voc", box(5, 5, 5, 5)), "train")[0]
    assert target["boxes"].tolist() == [[4, 4, 5, 5]]


def test_an_image_of_another_size_names_its_annotation(tmp_path):
    root = write_voc(tmp_path / "voc", image_size=(48, 64))
    one_line_error(root, r"Annotations/2007_000001\.xml is recorded as 64x48 but .*2007_000001\.jpg is 48x64")


def test_an_unreadable_image_is_named_or_skipped(tmp_path):
    root = write_voc(tmp_path / "voc", ids=("2007_000001", "2007_000002"))
    (root / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
    one_line_error(root, r"corrupt or unreadable image .*2007_000001\.jpg")
    dataset = VocDetection(root, "train", skip_corrupt=True)
    assert dataset[0][1]["image_id"] == 2 and dataset.get(0) is None


# ---- the config


@pytest.mark.parametrize("overrides, match", [
    (dict(dataset="voc"), r"dataset: voc needs data_root \(the VOC2012 or VOC2007 folder"),
    (dict(dataset="builtin_voc", data_root="data/VOC2012"),
     r"dataset is builtin_voc, which is generated under \$MBBACKBONES_DATA; to train on data/VOC2012, set dataset: "
     r"voc"),
    (dict(dataset="builtin", data_root="data/coco"), r"to train on data/coco, set dataset: coco"),
    (dict(dataset="voc", data_root="data/VOC2012", train_images="a", val_annotations="b.json"),
     r"train_images, val_annotations: COCO-format paths, but dataset is voc, which reads the VOC layout"),
    (dict(dataset="builtin_voc", label_mode="coco91"), r"label_mode: coco91 numbers COCO's categories; VOC's 20"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        DetectionTask.check(load_config(None, dict(model="ssdlite320_mbv3_large", **overrides)))


def test_voc_configs_pass_the_checks():
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("ssdlite320_mbv3_large_voc.yaml", "ssdlite320_mbv3_large_builtin_voc.yaml"):
        cfg = load_config(root / name)
        DetectionTask.check(cfg)
        assert (cfg.train_split, cfg.val_split) == ("train", "val")  # VOC's list names, without the keys set
    assert load_config(None, dict(dataset="voc", data_root="VOC2012", val_split="trainval")).val_split == "trainval"
    assert load_config(None, dict(dataset="coco", data_root="coco")).train_split == "train2017"


def test_eval_tool_refuses_a_coco_label_mode_on_voc(tmp_path, capsys):
    from heads.cli import eval_det_main

    results = tmp_path / "results.json"
    results.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        eval_det_main(["--results", str(results), "--data-root", str(write_voc(tmp_path / "voc")), "--dataset", "voc",
                       "--split", "train", "--label-mode", "coco91"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --label-mode coco91 numbers COCO's categories; VOC's 20 classes are "
                                       "labels 1..20: leave it out\n")
    metrics = eval_det_main(["--results", str(results), "--data-root", str(tmp_path / "voc"), "--dataset", "voc",
                             "--split", "train"])
    assert metrics.stats["voc07_mAP50"] == metrics.stats["voc_mAP50"] == 0.0
