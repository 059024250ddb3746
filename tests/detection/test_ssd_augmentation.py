"""SSD augmentation: the named policies are torchvision's presets (same ops, order, probabilities and ranges, checked
op by op against torchvision.transforms.v2 with the parameters ours drew), and boxes follow the image."""
import random
from collections import Counter

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from conftest import REAL
from scipy.stats import ks_2samp
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from heads.detection.coco import CocoDetection
from heads.detection.transforms import (
    MEAN_FILL,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    SSDTrainTransform,
)
from heads.training.tasks import DetectionTask

POLICIES = DetectionTask.policies
MEAN = (123.0, 117.0, 104.0)  # references/detection/presets.py
PRESETS = {  # DetectionPresetTrain's ops, in its order
    "ssd": lambda: [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=MEAN), v2.RandomIoUCrop(),
                    v2.RandomHorizontalFlip(p=0.5)],
    "ssdlite": lambda: [v2.RandomIoUCrop(), v2.RandomHorizontalFlip(p=0.5)],
}
OURS = {v2.RandomPhotometricDistort: "RandomPhotometricDistort", v2.RandomZoomOut: "RandomZoomOut",
        v2.RandomIoUCrop: "RandomIoUCrop", v2.RandomHorizontalFlip: "HorizontalFlip"}
SETTINGS = {  # attributes that hold each op's probabilities and ranges, alike in ours and torchvision's
    "RandomPhotometricDistort": ("brightness", "contrast", "saturation", "hue"),
    "RandomZoomOut": ("side_range", "p"),
    "RandomIoUCrop": ("min_scale", "max_scale", "min_aspect_ratio", "max_aspect_ratio", "options", "trials"),
    "HorizontalFlip": ("p",),
}


@pytest.fixture(scope="module")
def real_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real COCO sample at half size (240 x 320) with its six boxes."""
    image, target = CocoDetection(REAL / "coco_sample", train=True)[0]
    image = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA)
    return image, target["boxes"].numpy() / 2, target["labels"].numpy()


def torchvision_params(name: str, params: dict, boxes: torch.Tensor) -> dict:
    """Our op's drawn parameters in the form torchvision's op of the same name takes them."""
    if name == "RandomZoomOut":
        return {"padding": [params[f"pad_{side}"] for side in ("left", "top", "right", "bottom")]}
    if name == "RandomIoUCrop":
        if params["min_iou"] is None:
            return {}  # the keep-the-image option
        left, top, right, bottom = params["crop_coords"]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # torchvision's make_params: centres strictly inside
        inside = (left < centres[:, 0]) & (centres[:, 0] < right) & (top < centres[:, 1]) & (centres[:, 1] < bottom)
        return dict(top=top, left=left, height=bottom - top, width=right - left, is_within_crop_area=inside)
    return params


def torchvision_op(op: v2.Transform, params: dict | None, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray):
    """torchvision's ``op`` forced to ``params`` (None: not applied), then SanitizeBoundingBoxes, on numpy arrays."""
    image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
    boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:])
    if params is not None:
        params = torchvision_params(OURS[type(op)], params, boxes)
        image, boxes = op.transform(image, params), op.transform(boxes, params)
    sample = v2.SanitizeBoundingBoxes()({"image": image, "boxes": boxes, "labels": torch.from_numpy(labels)})
    return sample["image"].permute(1, 2, 0).numpy(), sample["boxes"].numpy(), sample["labels"].numpy()


# ---- the policies are torchvision's


@pytest.mark.parametrize("policy", PRESETS)
def test_policy_has_the_presets_ops_in_order_with_their_settings(policy):
    ours = SSDTrainTransform(**POLICIES[policy]).augment.transforms
    theirs = PRESETS[policy]()
    assert [type(op).__name__ for op in ours] == [OURS[type(op)] for op in theirs]
    for mine, reference in zip(ours, theirs):
        for name in SETTINGS[type(mine).__name__]:
            assert tuple(np.ravel(getattr(mine, name))) == tuple(np.ravel(getattr(reference, name))), name
    photometric = [(mine, reference) for mine, reference in zip(ours, theirs) if hasattr(reference, "brightness")]
    assert all(mine.p_each == reference.p for mine, reference in photometric)  # each distortion and the shuffle
    zoom_out = [op for op in ours if isinstance(op, RandomZoomOut)]
    assert all(np.allclose(op.fill, MEAN) for op in zoom_out)


@pytest.mark.filterwarnings("ignore:Got processor for bboxes")  # the step that only distorts colours
@pytest.mark.parametrize("policy", PRESETS)
def test_each_op_equals_torchvision_given_the_same_parameters(policy, real_sample):
    """Op by op through the policy: torchvision's op forced to the parameters ours drew, on the same input, gives
    our image and, after SanitizeBoundingBoxes, our boxes and labels."""
    transform = SSDTrainTransform(**POLICIES[policy])
    bbox_params = transform.augment.processors["bboxes"].params
    steps = [A.Compose([op], bbox_params=bbox_params, save_applied_params=True) for op in transform.augment.transforms]
    seen = {"contrast_before": set(), "hue": 0, "shuffle": 0, "RandomZoomOut": 0, "min_iou": set(), "HorizontalFlip": 0}
    for seed in range(40):
        generators = np.random.default_rng(seed), random.Random(seed)
        image, boxes, labels = real_sample
        for step, reference in zip(steps, PRESETS[policy]()):
            step.set_random_state(*generators)
            out = step(image=image, bboxes=boxes, labels=labels)
            name = type(step.transforms[0]).__name__
            params = dict(out["applied_transforms"]).get(name)
            expected_image, expected_boxes, expected_labels = torchvision_op(reference, params, image, boxes, labels)
            image, boxes, labels = out["image"], np.asarray(out["bboxes"]).reshape(-1, 4), np.asarray(out["labels"])
            assert image.shape == expected_image.shape, (seed, name)
            error = np.abs(image.astype(int) - expected_image)
            if name == "RandomPhotometricDistort":
                photometric_error_is_rounding(error, params)
                seen["contrast_before"].add(params["contrast_before"] if params["contrast_factor"] else None)
                seen["hue"] += params["hue_factor"] is not None
                seen["shuffle"] += params["channel_permutation"] is not None
            else:
                assert error.max() == 0, (seed, name)
            np.testing.assert_allclose(boxes, expected_boxes, atol=1e-3, err_msg=f"seed {seed}, {name}")
            assert labels.tolist() == expected_labels.tolist(), (seed, name)
            seen[name] = seen.get(name, 0) + (params is not None)
            seen["min_iou"].add(params["min_iou"] if name == "RandomIoUCrop" else None)
    assert len(seen["min_iou"]) >= 4 and 5 < seen["HorizontalFlip"] < 35  # both branches ran
    if policy == "ssd":
        assert seen["contrast_before"] == {None, True, False}
        assert all(5 < seen[key] < 35 for key in ("hue", "shuffle", "RandomZoomOut"))


def photometric_error_is_rounding(error: np.ndarray, params: dict):
    """albumentations' contrast, saturation and hue kernels round where torchvision's truncate: up to a level each
    (see the next test), which the later factors (up to 1.5) amplify; brightness and channel permutation are exact."""
    rounded = [name for name in ("contrast", "saturation", "hue") if params[f"{name}_factor"] is not None]
    assert error.max() <= 2 * len(rounded), (rounded, error.max())


@pytest.mark.parametrize("name, factors", [("brightness", (0.875, 0.93, 1.125)), ("contrast", (0.5, 0.93, 1.5)),
                                           ("saturation", (0.5, 0.93, 1.5)), ("hue", (-0.05, 0.013, 0.05))])
def test_each_distortion_equals_torchvisions_to_a_level(name, factors, real_sample):
    ours, theirs = RandomPhotometricDistort(), v2.RandomPhotometricDistort()
    image = real_sample[0]
    params = dict(brightness_factor=None, contrast_factor=None, saturation_factor=None, hue_factor=None,
                  contrast_before=True, channel_permutation=None)
    for factor in factors:
        forced = {**params, f"{name}_factor": factor}
        expected = theirs.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), forced)
        error = np.abs(ours.apply(image, **forced).astype(int) - expected.permute(1, 2, 0).numpy())
        assert error.max() <= (name != "brightness"), factor


@pytest.mark.parametrize("contrast_before", [True, False])
def test_contrast_goes_where_torchvision_puts_it(contrast_before, real_sample):
    """Before saturation or after hue: with clipping the orders differ by tens of levels, ours by a few at most."""
    ours, theirs = RandomPhotometricDistort(), v2.RandomPhotometricDistort()
    image = real_sample[0]
    forced = dict(brightness_factor=None, contrast_factor=1.5, saturation_factor=0.5, hue_factor=0.05,
                  contrast_before=contrast_before, channel_permutation=[2, 0, 1])
    expected = theirs.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), forced)
    expected = expected.permute(1, 2, 0).numpy().astype(int)
    photometric_error_is_rounding(np.abs(ours.apply(image, **forced) - expected), forced)
    other_order = ours.apply(image, **{**forced, "contrast_before": not contrast_before})
    assert np.abs(other_order - expected).max() > 20


def test_photometric_parameters_are_drawn_like_torchvisions():
    ours, theirs, count = RandomPhotometricDistort(), v2.RandomPhotometricDistort(), 2000
    ours.set_random_state(np.random.default_rng(0), random.Random(0))
    image = tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8))
    mine, reference = [ours.get_params() for _ in range(count)], [theirs.make_params([image]) for _ in range(count)]
    for key in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor", "channel_permutation"):
        drawn = [[p[key] for p in draws if p[key] is not None] for draws in (mine, reference)]
        assert abs(len(drawn[0]) - len(drawn[1])) / count < 0.06, key  # both apply it half of the time
        if key == "channel_permutation":  # all six orders, equally often
            orders = [Counter(tuple(int(channel) for channel in order) for order in d) for d in drawn]
            assert len(orders[0]) == len(orders[1]) == 6
            assert all(abs(orders[0][o] / len(drawn[0]) - orders[1][o] / len(drawn[1])) < 0.06 for o in orders[1])
        else:
            assert ks_2samp(*drawn).pvalue > 1e-3, key
    before = [sum(p["contrast_before"] for p in draws) / count for draws in (mine, reference)]
    assert abs(before[0] - before[1]) < 0.06


def test_zoom_out_canvas_is_drawn_like_torchvisions():
    ours, theirs, count = RandomZoomOut(), v2.RandomZoomOut(), 2000
    ours.set_random_state(np.random.default_rng(0), random.Random(0))
    height, width = 30, 40
    mine = [ours.get_params_dependent_on_data({"shape": (height, width)}, {}) for _ in range(count)]
    mine = np.array([[p["pad_left"], p["pad_top"], p["pad_right"], p["pad_bottom"]] for p in mine])
    image = tv_tensors.Image(torch.zeros(3, height, width))
    reference = np.array([theirs.make_params([image])["padding"] for _ in range(count)])
    for column, name in enumerate(["left", "top", "right", "bottom"]):
        assert ks_2samp(mine[:, column], reference[:, column]).pvalue > 1e-3, name


def test_iou_crop_is_drawn_like_torchvisions(real_sample):
    """Crop position and size, and how often the image is kept whole, against torchvision's make_params."""
    image, boxes, _ = real_sample
    height, width = image.shape[:2]
    ours, theirs, count = RandomIoUCrop(), v2.RandomIoUCrop(), 400
    ours.set_random_state(np.random.default_rng(0), random.Random(0))
    normalized = {"bboxes": boxes / [width, height, width, height]}
    mine = [ours.get_params_dependent_on_data({"shape": (height, width)}, normalized)["crop_coords"]
            for _ in range(count)]
    flat = [tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
            tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))]
    reference = [theirs.make_params(flat) for _ in range(count)]
    reference = [(p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]) if p else (0, 0, width, height)
                 for p in reference]
    whole = [sum(crop == (0, 0, width, height) for crop in crops) / count for crops in (mine, reference)]
    assert 0.1 < whole[1] and abs(whole[0] - whole[1]) < 0.08
    for column, name in enumerate(["left", "top", "right", "bottom"]):
        assert ks_2samp(np.array(mine)[:, column], np.array(reference)[:, column]).pvalue > 1e-3, name


def test_iou_crop_overlaps_a_box_by_its_minimum_iou(real_sample):
    """Every crop overlaps a box whose centre it contains with at least the IoU drawn for it, and its sides keep
    the scale and aspect ranges."""
    image, boxes, labels = real_sample
    height, width = image.shape[:2]
    crop = A.Compose([RandomIoUCrop()], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]),
                     save_applied_params=True)
    drawn = set()
    for seed in range(200):
        crop.set_random_seed(seed)
        params = crop(image=image, bboxes=boxes, labels=labels)["applied_transforms"][0][1]
        left, top, right, bottom = params["crop_coords"]
        drawn.add(params["min_iou"])
        if params["min_iou"] is None:
            assert (left, top, right, bottom) == (0, 0, width, height)
            continue
        assert 0.3 * width - 1 <= right - left <= width and 0.3 * height - 1 <= bottom - top <= height
        assert 0.5 <= (right - left) / (bottom - top) <= 2.0
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres > [left, top]).all(axis=1) & (centres < [right, bottom]).all(axis=1)
        iou = box_iou(torch.from_numpy(boxes[inside]), torch.tensor([[left, top, right, bottom]], dtype=torch.float32))
        assert iou.max() >= params["min_iou"], seed
    assert drawn == {0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None}


# ---- boxes follow the image


COLOURS = np.array([(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30)], dtype=np.uint8)
BOXES = np.array([[10, 10, 110, 90], [150, 20, 290, 130], [40, 120, 140, 190], [200, 150, 280, 195]], np.float32)


def painted_sample():
    """A 300 x 200 image whose four boxes are filled with distinct colours, labels 1..4."""
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    for colour, (x0, y0, x1, y1) in zip(COLOURS, BOXES.astype(int)):
        image[y0:y1, x0:x1] = colour
    return image, BOXES, np.arange(1, 5)


@pytest.mark.parametrize("policy", POLICIES)
def test_augmented_boxes_stay_inside_the_image(policy):
    transform = SSDTrainTransform(160, **POLICIES[policy])
    image, boxes, labels = painted_sample()
    for seed in range(60):
        out, out_boxes, out_labels = transform(image, boxes, labels, seed)
        assert out.shape == (160, 160, 3) and out.dtype == np.uint8
        assert out_boxes.dtype == np.float32 and out_labels.dtype == np.int64 and len(out_boxes) == len(out_labels)
        assert (out_boxes >= 0).all() and (out_boxes <= 160).all() and (out_boxes[:, 2:] > out_boxes[:, :2]).all()


@pytest.mark.parametrize("zoom_out", [True, False])
def test_augmented_boxes_keep_their_labels(zoom_out):
    """Each output box still covers the colour its label was painted with (photometric distortion off)."""
    transform = SSDTrainTransform(160, zoom_out=zoom_out, photometric=False)
    image, boxes, labels = painted_sample()
    for seed in range(60):
        out, out_boxes, out_labels = transform(image, boxes, labels, seed)
        assert len(set(out_labels.tolist())) == len(out_labels) == len(out_boxes)
        centres = ((out_boxes[:, :2] + out_boxes[:, 2:]) / 2).astype(int)
        for (x, y), label in zip(centres, out_labels):
            nearest = np.abs(COLOURS.astype(int) - out[y, x]).sum(axis=1).argmin()
            assert nearest + 1 == label, f"seed {seed}: box of label {label} covers colour {out[y, x]}"


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_output_whatever_ran_before(policy):
    image, boxes, labels = painted_sample()
    first, other = SSDTrainTransform(**POLICIES[policy]), SSDTrainTransform(**POLICIES[policy])
    expected = first(image, boxes, labels, 3)
    first(image, boxes, labels, 4)
    for out in (first(image, boxes, labels, 3), other(image, boxes, labels, 3)):
        assert all(np.array_equal(a, b) for a, b in zip(out, expected))


def test_images_without_boxes_pass():
    image, _, _ = painted_sample()
    for seed in range(10):
        out, boxes, labels = SSDTrainTransform(128)(image, np.zeros((0, 4)), np.zeros(0), seed)
        assert out.shape == (128, 128, 3) and boxes.shape == (0, 4) and labels.shape == (0,)


@pytest.mark.parametrize("hflip, expected", [(0.0, [32, 32, 160, 160]), (1.0, [160, 32, 288, 160])])
def test_resize_and_flip_map_a_known_box(hflip, expected):
    """A 400 x 200 image resized to 320 x 320 scales x by 0.8 and y by 1.6; flipping maps x to 400 - x."""
    transform = SSDTrainTransform(320, zoom_out=False, iou_crop=False, photometric=False, hflip=hflip)
    image = np.zeros((200, 400, 3), dtype=np.uint8)
    _, boxes, labels = transform(image, np.array([[40, 20, 200, 100]]), np.array([7]), seed=0)
    np.testing.assert_allclose(boxes, [expected], atol=1e-3)
    assert labels.tolist() == [7]


def test_boxes_are_filtered_before_the_resize_only():
    """As SanitizeBoundingBoxes before the model resizes: a box 1.5 pixels wide survives a resize to a third, one
    under a pixel wide does not."""
    transform = SSDTrainTransform(100, **POLICIES["none"])
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    _, boxes, labels = transform(image, np.array([[10, 10, 11.5, 40], [50, 50, 50.5, 90]]), np.array([1, 2]), seed=0)
    np.testing.assert_allclose(boxes, [[10 / 3, 10 / 3, 11.5 / 3, 40 / 3]], atol=1e-4)
    assert labels.tolist() == [1]


def test_iou_crop_keeps_boxes_whose_centres_are_inside():
    crop = A.Compose([RandomIoUCrop()], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]),
                     save_applied_params=True)
    image, boxes, labels = painted_sample()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for seed in range(60):
        crop.set_random_seed(seed)
        out = crop(image=image, bboxes=boxes, labels=labels)
        x0, y0, x1, y1 = out["applied_transforms"][0][1]["crop_coords"]
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        assert np.asarray(out["labels"], dtype=int).tolist() == labels[inside].tolist()
        expected = (boxes[inside] - [x0, y0, x0, y0]).clip(0, [x1 - x0, y1 - y0] * 2)
        np.testing.assert_allclose(out["bboxes"], expected.reshape(-1, 4), atol=1e-3)
        assert out["image"].shape == (y1 - y0, x1 - x0, 3)


def test_zoom_out_pads_with_mean_and_moves_boxes():
    zoom = A.Compose([RandomZoomOut(p=1.0)], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]),
                     save_applied_params=True)
    image, boxes, labels = painted_sample()
    for seed in range(20):
        zoom.set_random_seed(seed)
        out = zoom(image=image, bboxes=boxes, labels=labels)
        pads = out["applied_transforms"][0][1]
        height, width = out["image"].shape[:2]
        assert 200 <= height <= 800 and 300 <= width <= 1200
        np.testing.assert_allclose(out["bboxes"], boxes + [pads["pad_left"], pads["pad_top"]] * 2, atol=1e-3)
        if pads["pad_top"]:
            assert (out["image"][0, 0] == MEAN_FILL).all()
