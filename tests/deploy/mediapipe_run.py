"""Run a .tflite file with MediaPipe's tasks, given nothing but its path; print the results as JSON.

Runs in a venv with mediapipe (and numpy, Pillow) alone: no torch, no mbbackbones (test_mediapipe.py calls it).

    python mediapipe_run.py detector|segmenter MODEL.tflite PHOTO... > results.json

detector: per photo ``{"boxes": [[x0, y0, x1, y1], ...] (photo pixels), "scores", "labels" (the category index),
"names"}``; segmenter: per photo ``{"mask": path of an .npy file of the category mask}`` (written beside MODEL).
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
    detector = vision.ObjectDetector.create_from_model_path(model)
    results = []
    for path in photos:
        found = detector.detect(photo(path)).detections
        results.append({
            "boxes": [[d.bounding_box.origin_x, d.bounding_box.origin_y, d.bounding_box.origin_x + d.bounding_box.width,
                       d.bounding_box.origin_y + d.bounding_box.height] for d in found],
            "scores": [d.categories[0].score for d in found], "labels": [d.categories[0].index for d in found],
            "names": [d.categories[0].category_name for d in found]})
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
