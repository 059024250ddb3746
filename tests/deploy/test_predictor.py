"""heads.Predictor: every kind of source, the model's own pre- and post-processing, pictures and result files."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmarking.workloads import calibrated_torchvision_detector
from conftest import randomize_batchnorm, same_detections
from PIL import Image
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.transforms.functional import normalize

import heads
from heads.cli import eval_det_main, infer_main
from heads.data import read_image
from heads.deploy.predictor import Predictor, fuse
from heads.detection.builtin import builtin_coco
from heads.detection.coco import CocoDetection
from heads.results import Detections, Segmentation
from heads.segmentation.lraspp import MAX_PIXELS

DETECTOR, SEGMENTER = "ssdlite320_mbv3_small_reduced", "lraspp_mbv3_small_reduced"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("data_home")  # built-in sets written under a temporary folder


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A detector that has learned: fitted (at 160 pixels, 100 steps) to the first 4 built-in validation images, on
    which the folder-run test scores it (AP50 1.0 measured); as a run folder."""
    folder = tmp_path_factory.mktemp("det")
    val = CocoDetection(builtin_coco(), "val2017")
    ids = set(val.image_ids[:4])
    records = val.coco.dataset
    subset = {**records, "images": [r for r in records["images"] if r["id"] in ids],
              "annotations": [r for r in records["annotations"] if r["image_id"] in ids]}
    (folder / "first4.json").write_text(json.dumps(subset))
    files = dict(train_images=str(val.image_dir), val_images=str(val.image_dir),
                 train_annotations=str(folder / "first4.json"), val_annotations=str(folder / "first4.json"))
    return heads.train(dict(model=DETECTOR, model_kwargs={"size": 160}, dataset="coco", **files, augment="none",
                            batch_size=4, workers=0, optimizer="adam", lr=3e-3, lr_batch=4, warmup_steps=0,
                            max_steps=100, eval_every=0, bn_recalibrate=4, tensorboard=False,
                            output=str(folder / "run")))


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return heads.create_model(SEGMENTER).eval()


def uint8_batch(image: np.ndarray, size) -> torch.Tensor:
    """The photo resized once, in uint8, as the predictor's pre-processing does (torch's own bilinear kernel)."""
    return F.interpolate(torch.from_numpy(image.copy()).permute(2, 0, 1)[None], size=size, mode="bilinear",
                         align_corners=False)


@pytest.fixture(scope="module")
def torchvision_detector(tmp_path_factory):
    """torchvision's ssdlite320_mobilenet_v3_large with BatchNorm statistics of real photos, and its weights file."""
    photos = [torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float() / 255
              for path in heads.SAMPLE_IMAGES.values()]
    reference = calibrated_torchvision_detector(photos)
    path = tmp_path_factory.mktemp("tv") / "ssdlite320_tv.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_detections_are_torchvisions_on_the_resized_photo(torchvision_detector):
    reference, path = torchvision_detector
    predictor = Predictor(path, name="ssdlite320_mbv3_large_reduced", fuse=False)
    image = read_image(heads.SAMPLE_IMAGES["3dogs"])
    result = predictor(image)[0]
    with torch.no_grad():  # torchvision on the photo resized once in uint8 (its own 320x320 resize is then exact)
        expected = reference([uint8_batch(image, (320, 320))[0].float() / 255])[0]
    height, width = image.shape[:2]
    expected["boxes"] = expected["boxes"] * torch.tensor([width, height, width, height]) / 320
    assert isinstance(result, Detections) and len(result.boxes) == len(expected["boxes"]) > 0
    actual = {key: getattr(result, key) for key in ("boxes", "scores", "labels")}
    assert same_detections(expected, actual, limit=300)
    assert result.names == [predictor.categories[label] for label in expected["labels"].tolist()]
    assert result.timings.model_ms > 0 and result.timings.total_ms >= result.timings.model_ms


def test_uint8_resizing_differs_from_float_resizing_by_rounding_only():
    image = read_image(heads.SAMPLE_IMAGES["3dogs"])
    floats = F.interpolate(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(), size=(320, 320),
                           mode="bilinear", align_corners=False)
    assert (uint8_batch(image, (320, 320)).float() - floats).abs().max() <= 1.0


def test_fusion_keeps_the_outputs_and_leaves_the_model_alone(detector):
    model = heads.create_model(DETECTOR, pretrained=detector.best).eval()
    fused = fuse(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) and fused.meta == model.meta
    x = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        for ours, theirs in zip(fused.forward_batch(x), model.forward_batch(x)):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    results = [Predictor(model, fuse=on)(heads.SAMPLE_IMAGES["kitten"])[0] for on in (True, False)]
    torch.testing.assert_close(results[0].scores[:20], results[1].scores[:20], atol=1e-4, rtol=0)


def test_every_kind_of_source_gives_one_result_per_image(detector, tmp_path):
    predictor = Predictor(detector.folder)
    paths = list(heads.SAMPLE_IMAGES.values())
    photo = read_image(paths[0])
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in paths:
        shutil.copy(path, folder)
    sources = {
        "path": (str(paths[0]), 1), "Path": (paths[0], 1), "folder": (folder, 2), "glob": (str(folder / "*.jpg"), 2),
        "list": ([str(paths[0]), folder], 3), "PIL": (Image.open(paths[0]), 1), "array": (photo, 1),
        "uint8 tensor": (torch.from_numpy(photo.copy()).permute(2, 0, 1), 1),
        "float tensor": (torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255, 1),
        "list of arrays": ([photo, photo[:100]], 2),
    }
    reference = predictor(photo)[0]
    for kind, (source, count) in sources.items():
        results = predictor(source)
        assert len(results) == count, kind
        first = next(r for r in results if r.name in (paths[0].stem, "image"))  # the photo, wherever it comes
        # batched with other images, the network may round differently (another kernel for another batch size)
        torch.testing.assert_close(first.scores[:20], reference.scores[:20], atol=1e-4, rtol=0, msg=kind)
    for source in (folder, str(folder / "*.jpg"), str(folder / "*")):  # folders and globs: sorted by name
        assert [r.name for r in predictor(source)] == ["3dogs", "kitten"]
    for bad in (torch.rand(1, 3, 8, 8), np.zeros((8, 8), np.uint8)):
        with pytest.raises(ValueError, match="expected"):
            predictor(bad)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predictor(tmp_path / "nowhere.jpg")


def test_a_folder_run_writes_pictures_and_detections_that_eval_det_scores(detector, tmp_path, capsys):
    coco = CocoDetection(builtin_coco(), "val2017")
    images = tmp_path / "val2017"
    images.mkdir()
    for image_id in coco.image_ids[:4]:
        shutil.copy(coco.image_dir / coco.coco.imgs[image_id]["file_name"], images)
    results = Predictor(detector.folder)(images, out=tmp_path / "out")
    pictures = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pictures == sorted(p.stem + ".png" for p in images.iterdir()) and len(results) == 4
    with Image.open(tmp_path / "out" / pictures[0]) as picture:
        assert picture.size == Image.open(images / (pictures[0][:-4] + ".jpg")).size
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == set(coco.image_ids[:4])
    assert {d["category_id"] for d in detections} <= set(coco.coco.cats)
    assert ((tmp_path / "out" / "detections.json").stat().st_mode & 0o777) == 0o666 & ~current_umask()
    metrics = eval_det_main(["--results", str(tmp_path / "out" / "detections.json"), "--builtin", "--limit", "4"])
    model_metrics = eval_det_main(["--weights", str(detector.folder), "--builtin", "--limit", "4"])
    assert model_metrics.stats["AP50"] >= 0.8  # it has learned these images (1.0 measured)
    assert metrics.stats["AP50"] == pytest.approx(model_metrics.stats["AP50"], abs=0.02)  # uint8 vs float resize


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_thresholds_change_the_models_detections(detector):
    image = read_image(heads.SAMPLE_IMAGES["3dogs"])
    default = Predictor(detector.folder)(image)[0]
    strict = Predictor(detector.folder, score_thresh=0.2, max_det=5)(image)[0]
    assert len(strict.scores) <= 5 and (strict.scores >= 0.2).all()
    assert torch.equal(strict.scores, default.scores[default.scores > 0.2][:5])
    with pytest.raises(ValueError, match="score_thresh are detection settings"):
        Predictor(heads.create_model(SEGMENTER), score_thresh=0.5)


@pytest.mark.parametrize("options, message", [
    (dict(score_thresh=1.5), "score_thresh=1.5 must be a number in [0, 1]"),
    (dict(score_thresh=float("nan")), "score_thresh=nan must be a number in [0, 1]"),
    (dict(nms_thresh=7), "nms_thresh=7 must be a number in [0, 1]"),
    (dict(max_det=-1), "max_det=-1 must be an integer of at least 1"),
])
def test_out_of_range_thresholds_are_refused(options, message, detector):
    with pytest.raises(ValueError) as error:
        Predictor(detector.folder, **options)
    assert message in str(error.value)


def test_a_float_image_outside_0_1_is_refused(detector):
    photo = torch.from_numpy(read_image(heads.SAMPLE_IMAGES["3dogs"]).copy()).permute(2, 0, 1).float()  # 0..255
    with pytest.raises(ValueError, match=r"float images are in \[0, 1\], this one spans [0-9.]+\.\.[0-9.]+; pass"):
        Predictor(detector.folder)(photo)


def test_results_plot_save_and_json(detector, segmenter, tmp_path):
    detections = Predictor(detector.folder, score_thresh=0.05)(heads.SAMPLE_IMAGES["3dogs"])[0]
    picture = detections.plot()
    assert picture.shape == detections.image.shape and (picture != detections.image).any()
    detections.save(tmp_path / "boxes.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "boxes.png")), picture)
    entries = detections.to_json(image_id=7)
    assert len(entries) == len(detections.scores) and entries[0]["image_id"] == 7
    x0, y0, x1, y1 = detections.boxes[0].tolist()
    assert entries[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
    mask = Predictor(segmenter)(heads.SAMPLE_IMAGES["kitten"])[0]
    assert isinstance(mask, Segmentation) and mask.mask.shape == mask.image.shape[:2] and mask.mask.dtype == np.uint8
    assert mask.plot().shape == mask.image.shape


def test_segmentation_is_torchvisions_argmax(tmp_path):
    reference = randomize_batchnorm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21))
    torch.save(reference.state_dict(), tmp_path / "lraspp_tv.pth")
    image = read_image(heads.SAMPLE_IMAGES["kitten"])
    model = heads.create_model("lraspp_mbv3_large", num_classes=21, pretrained=tmp_path / "lraspp_tv.pth")
    result = Predictor(model, fuse=False)(image)[0]
    with torch.no_grad():  # torchvision's input: the photo in [0, 1], ImageNet-normalised
        x = normalize(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        expected = reference(x[None])["out"][0].argmax(0)
    assert result.mask.shape == image.shape[:2] and (result.mask == expected.numpy()).mean() >= 0.999


def test_a_huge_image_is_segmented_at_a_bounded_size(segmenter):
    seen = []
    hook = segmenter.backbone.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    try:
        result = Predictor(segmenter, fuse=False)(np.zeros((6000, 8000, 3), dtype=np.uint8))[0]
    finally:
        hook.remove()
    height, width = seen[-1][-2:]
    assert height * width <= MAX_PIXELS and abs(width / height - 8000 / 6000) < 0.01
    assert result.mask.shape == (6000, 8000)


def test_infer_never_overwrites_its_inputs(detector, tmp_path, capsys):
    png = tmp_path / "shot.png"
    Image.open(heads.SAMPLE_IMAGES["3dogs"]).save(png)
    before = png.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        infer_main(["--weights", str(detector.folder), str(png), "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "shot.png is an input" in error and error.count("\n") == 1
    assert png.read_bytes() == before


def test_infer_prints_steady_state_timings_and_where_results_went(detector, tmp_path, capsys):
    results = infer_main(["--weights", str(detector.folder), str(heads.SAMPLE_IMAGES["3dogs"]),
                          str(heads.SAMPLE_IMAGES["kitten"]), "--out", str(tmp_path / "out"), "--max-det", "3"])
    out = capsys.readouterr().out
    assert "mean over 2 images (after a warm-up)" in out and f"to {tmp_path / 'out'}" in out
    assert all(len(r.scores) <= 3 for r in results)
