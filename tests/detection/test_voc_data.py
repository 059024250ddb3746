"""Pascal VOC's layout, the built-in VOC-layout set, and the VOC detection reader, as specifications (errors:
test_voc_errors.py; the metric: test_voc_eval.py)."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from heads.data import DataError
from heads.detection.evaluate import evaluate
from heads.detection.voc import VocDetection
from heads.voc import CLASSES, SEGMENTATION_CLASSES, VOID, builtin_voc, palette

SPLITS = ("train", "val", "trainval")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return builtin_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=30, num_val=10)


def ids(root, kind, split):
    return (root / "ImageSets" / kind / f"{split}.txt").read_text().split()


def xml_objects(path):
    """The test's own reading of a VOC XML: (name, difficult, [xmin, ymin, xmax, ymax]) per object."""
    node = ET.parse(path).getroot()
    return [(obj.findtext("name"), int(obj.findtext("difficult")),
             [int(obj.findtext(f"bndbox/{corner}")) for corner in ("xmin", "ymin", "xmax", "ymax")])
            for obj in node.findall("object")]


# ---- the shared layout knowledge


def test_palette_is_the_devkits_colour_map():
    colours = palette()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    # VOC's colours: background black, aeroplane (1) dark red, bicycle (2) green, bird (3) olive, person (15)
    # (192, 128, 128), tvmonitor (20) (0, 64, 128), void (255) (224, 224, 192)
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
                20: (0, 64, 128), 255: (224, 224, 192)}
    assert {index: tuple(colours[index].tolist()) for index in expected} == expected
    assert len({tuple(colour) for colour in colours.tolist()}) == 256


def test_segmentation_classes_are_torchvision_voc_weights_label_space():
    from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights, LRASPP_MobileNet_V3_Large_Weights

    for weights in (LRASPP_MobileNet_V3_Large_Weights.DEFAULT, DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT):
        assert list(SEGMENTATION_CLASSES) == weights.meta["categories"]
    assert SEGMENTATION_CLASSES[1:] == CLASSES and len(CLASSES) == 20


# ---- the built-in set


def test_builtin_lists_follow_voc(voc):
    for kind in ("Main", "Segmentation"):
        train, val, trainval = (ids(voc, kind, split) for split in SPLITS)
        assert not set(train) & set(val) and trainval == train + val
    main, segmentation = ids(voc, "Main", "trainval"), ids(voc, "Segmentation", "trainval")
    assert len(main) == 40 and set(segmentation) < set(main) and len(segmentation) == 36  # VOC segments a subset
    assert sorted(path.stem for path in (voc / "JPEGImages").glob("*.jpg")) == sorted(main)
    assert sorted(path.stem for path in (voc / "Annotations").glob("*.xml")) == sorted(main)
    assert sorted(path.stem for path in (voc / "SegmentationClass").glob("*.png")) == sorted(segmentation)


def test_builtin_annotations_are_voc_xml(voc):
    segmented = set(ids(voc, "Segmentation", "trainval"))
    difficult = []
    for image_id in ids(voc, "Main", "trainval"):
        node = ET.parse(voc / "Annotations" / f"{image_id}.xml").getroot()
        assert node.tag == "annotation" and node.findtext("folder") == "VOC2012"
        assert node.findtext("filename") == f"{image_id}.jpg"
        size = [int(node.findtext(f"size/{tag}")) for tag in ("width", "height", "depth")]
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as image:
            assert (*image.size, len(image.getbands())) == tuple(size) and 200 <= min(image.size)
        assert node.findtext("segmented") == str(int(image_id in segmented))
        objects = node.findall("object")
        assert objects, "VOC's Main images all hold objects"
        for obj in objects:
            assert [child.tag for child in obj] == ["name", "pose", "truncated", "difficult", "bndbox"]
        for name, is_difficult, (xmin, ymin, xmax, ymax) in xml_objects(voc / "Annotations" / f"{image_id}.xml"):
            assert name in CLASSES
            assert 1 <= xmin < xmax <= size[0] and 1 <= ymin < ymax <= size[1]
            difficult.append(is_difficult)
    assert 0 < sum(difficult) < len(difficult) / 3


def test_builtin_masks_are_voc_palette_pngs_with_void_borders(voc):
    colours = palette()
    for image_id in ids(voc, "Segmentation", "trainval"):
        with Image.open(voc / "SegmentationClass" / f"{image_id}.png") as mask:
            assert mask.mode == "P" and mask.getpalette()[:768] == colours.ravel().tolist()
            values = np.asarray(mask)
        objects = xml_objects(voc / "Annotations" / f"{image_id}.xml")
        labels = {SEGMENTATION_CLASSES.index(name) for name, _, _ in objects}
        assert set(np.unique(values)) <= labels | {0, VOID} and VOID in values
        inside = np.zeros(values.shape, dtype=bool)
        for _, _, (xmin, ymin, xmax, ymax) in objects:
            inside[ymin - 1:ymax, xmin - 1:xmax] = True
        assert not ((values != 0) & (values != VOID) & ~inside).any(), "object pixels lie in their boxes"
        # as in VOC, void separates every object from the background: no object pixel touches a background one
        for a, b in ((values[1:], values[:-1]), (values[:, 1:], values[:, :-1])):
            assert not (((a == 0) & (b != 0) & (b != VOID)) | ((b == 0) & (a != 0) & (a != VOID))).any()


def test_builtin_is_reused_and_checked(voc, tmp_path):
    stamp = (voc / "Annotations").stat().st_mtime_ns
    assert builtin_voc(voc, num_train=30, num_val=10) == voc and (voc / "Annotations").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not the built-in VOC set for these arguments.*delete it or pass another root"):
        builtin_voc(voc, num_train=31, num_val=10)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="elsewhere exists but is not the built-in VOC set"):
        builtin_voc(tmp_path / "elsewhere")


def test_builtin_default_root_is_under_mbbackbones_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path))
    root = builtin_voc(num_train=2, num_val=1)
    assert root == tmp_path / "builtin_voc" and json.loads((root / "builtin.json").read_text())["num_train"] == 2
    assert [path.name for path in tmp_path.iterdir()] == ["builtin_voc"]  # no staging folder left


# ---- the detection reader


@pytest.mark.parametrize("split", ["train", "val"])
def test_reader_converts_voc_boxes_and_keeps_difficult_out_of_training(voc, split):
    train, val = VocDetection(voc, split, train=True), VocDetection(voc, split)
    assert train.num_classes == 21 and train.class_names == ["__background__", *CLASSES]
    assert train.label_to_category == {label: label for label in range(1, 21)}
    assert train.image_paths() == [voc / "JPEGImages" / f"{i}.jpg" for i in ids(voc, "Main", split)]
    for index, image_id in enumerate(ids(voc, "Main", split)):
        objects = xml_objects(voc / "Annotations" / f"{image_id}.xml")
        # 1-based pixels xmin..xmax are [xmin - 1, xmax) in the continuous coordinates of COCO and torchvision
        boxes = torch.tensor([[xmin - 1, ymin - 1, xmax, ymax] for _, _, (xmin, ymin, xmax, ymax) in objects],
                             dtype=torch.float32)
        labels = torch.tensor([CLASSES.index(name) + 1 for name, _, _ in objects])
        easy = torch.tensor([not is_difficult for _, is_difficult, _ in objects])
        image, target = train[index]
        torch.testing.assert_close(target["boxes"], boxes[easy], rtol=0, atol=0)
        assert target["labels"].tolist() == labels[easy].tolist()
        _, target = val[index]
        torch.testing.assert_close(target["boxes"], boxes, rtol=0, atol=0)
        if index == 0:
            with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as file:
                expected = torch.from_numpy(np.array(file.convert("RGB"))).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(image, expected, rtol=0, atol=0)
        annotations = val.coco.imgToAnns[target["image_id"]]
        assert [a["iscrowd"] for a in annotations] == [int(not e) for e in easy.tolist()]
        assert [a["bbox"] for a in annotations] == [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes.tolist()]


def test_ground_truth_scores_one_and_detections_on_difficult_boxes_cost_nothing(voc):
    dataset = VocDetection(voc, "val")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in dataset.coco.anns.values() if not a["iscrowd"]]
    on_difficult = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
                    for a in dataset.coco.anns.values() if a["iscrowd"]]
    assert on_difficult
    for detections in (perfect, perfect + on_difficult):
        metrics = evaluate(dataset.coco, detections, voc=dataset.voc_metric)
        assert metrics.stats["voc07_mAP50"] == metrics.stats["voc_mAP50"] == metrics.stats["AP"] == 1.0
    measured = [name for name, _, ap in metrics.voc.per_class if ap >= 0]
    assert sorted(measured) == ["aeroplane", "boat", "pottedplant", "sheep", "tvmonitor"]


def test_reader_reads_voc2007_style_files(tmp_path):
    """Details of the real files: ids without a year, <part> boxes inside a person, an object without <difficult>,
    coordinates written as decimals, per-class lists beside the split lists."""
    root = tmp_path / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    Image.new("RGB", (80, 60), (90, 90, 90)).save(root / "JPEGImages" / "000005.jpg")
    (root / "Annotations" / "000005.xml").write_text(
        "<annotation><folder>VOC2007</folder><filename>000005.jpg</filename>"
        "<size><width>80</width><height>60</height><depth>3</depth></size><segmented>0</segmented>"
        "<object><name>person</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>"
        "<bndbox><xmin>10</xmin><ymin>5</ymin><xmax>40</xmax><ymax>60</ymax></bndbox>"
        "<part><name>head</name><bndbox><xmin>20</xmin><ymin>5</ymin><xmax>30</xmax><ymax>15</ymax></bndbox></part>"
        "</object><object><name> chair </name><bndbox><xmin>50.0</xmin><ymin>30</ymin><xmax>80</xmax>"
        "<ymax>59.0</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    (root / "ImageSets" / "Main" / "person_test.txt").write_text("000005  1\n")
    dataset = VocDetection(root, "test")
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[9, 4, 40, 60], [49, 29, 80, 59]]
    assert [dataset.class_names[label] for label in target["labels"]] == ["person", "chair"]
    assert [a["iscrowd"] for a in dataset.coco.anns.values()] == [0, 0]
