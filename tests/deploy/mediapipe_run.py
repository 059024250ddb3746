"""Run a .tflite file with MediaPipe's tasks, given nothing but its path; print the results as JSON.

Runs in a venv with mediapipe (and numpy, Pillow) alone: no torch, no mbbackbones (test_mediapipe.py calls it).

    python mediapipe_run.py detector|segmenter MODEL.tflite PHOTO... > results.json

detector: per photo ``{"boxes": [[x0, y0, x1, y1], ...] (whole photo pixels), "scores", "names"}`` (the category
names: the label file's lines); segmenter: per photo ``{"mask": path of an .npy file of the category mask,
"labels"}`` (the .npy files beside MODEL).
"""
import json
import sys
from pathlib import Path

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions
from PIL import Image


def photo(path: str) -> mp.Image:
    with Image.open(path) as image:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels)


def detect(model: str, photos: list) -> list:
    """MediaPipe merges detections of one box into one with several categories: here one detection per category."""
    detector = vision.ObjectDetector.create_from_model_path(model)
    results = []
    for path in photos:
        detections = detector.detect(photo(path)).detections
        found = [(d.bounding_box, category) for d in detections for category in d.categories]
        results.append({"boxes": [[box.origin_x, box.origin_y, box.origin_x + box.width, box.origin_y + box.height]
                                  for box, _ in found],
                        "scores": [category.score for _, category in found],
                        "names": [category.category_name for _, category in found]})
    return results


def segment(model: str, photos: list) -> list:
    options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=model),
                                           output_category_mask=True, output_confidence_masks=False)
    segmenter = vision.ImageSegmenter.create_from_options(options)
    results = []
    for index, path in enumerate(photos):
        mask = segmenter.segment(photo(path)).category_mask.numpy_view()
        file = Path(model).with_name(f"mediapipe_mask_{index}.npy")
        np.save(file, np.asarray(mask).reshape(mask.shape[:2]))
        results.append({"mask": str(file), "labels": segmenter.labels})
    return results


if __name__ == "__main__":
    task, model, *photos = sys.argv[1:]
    print(json.dumps({"detector": detect, "segmenter": segment}[task](model, photos)))
