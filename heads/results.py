"""What a prediction returns, whatever the task: one :class:`Result` per image, which draws itself (``plot``), saves
its picture and result files (``write``) and says which records go into a run's shared results file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .files import atomic_write

DRAW_SCORE = 0.3  # detections drawn by Detections.plot when the predictor keeps the model's low threshold


class Timings(NamedTuple):
    """Milliseconds per step of one image's prediction (a batch's time shared out over its images)."""

    preprocess_ms: float
    model_ms: float
    postprocess_ms: float

    @property
    def total_ms(self) -> float:
        return sum(self)

    def __str__(self) -> str:
        return (f"pre-process {self.preprocess_ms:.1f} ms, model {self.model_ms:.1f} ms, "
                f"post-process {self.postprocess_ms:.1f} ms, total {self.total_ms:.1f} ms")


@dataclass
class Result:
    """One image's prediction: the image (RGB uint8), where it came from, and the model's class names; for a video's
    frame, its index and time in seconds since the first frame (None where the frames have no clock)."""

    records_file: ClassVar[str | None] = None  # the file of a folder run that gathers every image's records()
    outputs: ClassVar[str] = ""  # what a folder run writes beside the pictures, in words

    image: np.ndarray
    path: Path | None
    categories: list[str]
    timings: Timings | None
    dataset_ids: list | None = None
    frame: int | None = None
    timestamp: float | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else "image"

    def plot(self) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: str | os.PathLike, **options) -> Path:
        """:meth:`plot` as a PNG file."""
        path = Path(path)
        with atomic_write(path) as file:
            Image.fromarray(self.plot(**options)).save(file, format="PNG")
        return path

    def files(self, out: Path) -> list[Path]:
        """The files :meth:`write` writes into ``out``: the picture first."""
        return [out / f"{self.name}.png"]

    def write(self, out: Path) -> None:
        """The picture (and per-image result files) into ``out``."""
        self.save(self.files(out)[0])

    def records(self) -> list[dict]:
        """This image's entries of :attr:`records_file` (none by default)."""
        return []

    def prediction(self):
        """The prediction as evaluation scores it (the PyTorch model's output for the image)."""
        raise NotImplementedError


@dataclass
class Detections(Result):
    """Detections in original pixels: ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N], best first."""

    records_file: ClassVar[str | None] = "detections.json"
    outputs: ClassVar[str] = "detections.json (COCO results)"

    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    draw_score: float = DRAW_SCORE

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.categories[label] for label in self.labels.tolist()]

    def plot(self, min_score: float | None = None) -> np.ndarray:
        """The image with the boxes scoring ``min_score`` or more drawn, captioned with class and score."""
        from .visualize import draw_detections

        threshold = self.draw_score if min_score is None else min_score
        return np.asarray(draw_detections(self.image, self.boxes, self.labels, self.scores, self.categories,
                                          threshold))

    def to_json(self, image_id: int | str | None = None) -> list[dict]:
        """The detections in COCO's results format. ``image_id`` defaults to a video frame's index, else to the file's
        name, as a number where it is one (COCO's ``000000039769.jpg`` is image 39769); categories are the dataset's
        ids of the labels."""
        from .detection.evaluate import to_coco_results

        if image_id is None:
            image_id = self.frame if self.frame is not None else int(self.name) if self.name.isdigit() else self.name
        ids = self.dataset_ids or list(range(len(self.categories)))
        label_to_category = {label: int(cat) for label, cat in enumerate(ids) if cat is not None and label > 0}
        detections = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return to_coco_results([detections], [image_id], label_to_category)

    def records(self) -> list[dict]:
        return self.to_json()

    def prediction(self) -> dict[str, Tensor]:
        """torchvision's detection output: ``{"boxes", "scores", "labels"}``."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}


@dataclass
class Segmentation(Result):
    """A class index per pixel of the original image (``mask``, H x W uint8), and the palette to show it."""

    outputs: ClassVar[str] = "<name>_labelIds.png"

    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))

    def plot(self, alpha: float = 0.5) -> np.ndarray:
        """The image with each class painted in its colour."""
        from .visualize import class_palette, overlay_mask

        return np.asarray(overlay_mask(self.image, self.mask, class_palette(self.categories), alpha=alpha))

    def label_ids(self) -> np.ndarray:
        """The mask in the dataset's label ids (Cityscapes' for a Cityscapes model), for result files."""
        if not self.dataset_ids:
            return self.mask
        table = np.zeros(256, dtype=np.uint8)
        table[:len(self.dataset_ids)] = self.dataset_ids
        return table[self.mask]

    def prediction(self) -> Tensor:
        """The class map (H x W)."""
        return torch.from_numpy(self.mask)

    def files(self, out: Path) -> list[Path]:
        return [*super().files(out), out / f"{self.name}_labelIds.png"]

    def write(self, out: Path) -> None:
        picture, label_ids = self.files(out)
        self.save(picture)
        with atomic_write(label_ids) as file:
            Image.fromarray(self.label_ids()).save(file, format="PNG")

