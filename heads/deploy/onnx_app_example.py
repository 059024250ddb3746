"""A detector's .onnx file in an app, with onnxruntime, numpy and Pillow only (no torch, no mbbackbones).

The file that ``tools/export.py --out detector.onnx`` writes takes RGB uint8 images [B, H, W, 3] at its input size
and gives each image's final detections; its metadata (JSON under the key "mbbackbones") holds the input size and
the class names. Copy :func:`detect` into an app: ``tests/deploy/test_postprocessed.py`` runs this file as it is, in
a process where torch and our packages cannot be imported, and compares its detections with ``heads.Predictor``'s.
"""
import json

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def detect(model_path: str, photo_path: str) -> dict:
    """The photo's detections, best first: boxes [N, 4] (x1, y1, x2, y2 in photo pixels), scores [N], labels [N]
    (indices into the class names; ``dataset_ids[label]`` in the metadata is the dataset's category id) and names."""
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["mbbackbones"])
    height, width = meta["input_size"]
    photo = ImageOps.exif_transpose(Image.open(photo_path)).convert("RGB")  # upright, as viewers show it
    scale_x, scale_y = photo.width / width, photo.height / height
    image = np.asarray(resize(photo, width, height))[None]  # [1, H, W, 3] uint8
    outputs = session.run(["boxes", "scores", "labels", "count"], {"images": image})
    boxes, scores, labels, count = (output[0] for output in outputs)  # the first (only) image's
    labels = labels[:count]
    return {"boxes": boxes[:count] * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32),
            "scores": scores[:count], "labels": labels, "names": [meta["categories"][label] for label in labels]}


def resize(photo: Image.Image, width: int, height: int) -> Image.Image:
    """Bilinear at pixel centres without antialiasing, as the model's own resize (``Image.resize`` averages over
    the scale's footprint instead, which the model was not trained on)."""
    scale_x, scale_y = photo.width / width, photo.height / height
    return photo.transform((width, height), Image.Transform.AFFINE, (scale_x, 0, 0, 0, scale_y, 0),
                           resample=Image.Resampling.BILINEAR)
