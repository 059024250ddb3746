"""The built-in segmentation dataset: generated street scenes in the exact Cityscapes layout and naming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image
from tqdm import tqdm

from ..data import default_data_root, generated_once
from .cityscapes import ID_TO_TRAIN_ID, IMAGE_SUFFIX, LABEL_SUFFIX, PALETTE

BUILTIN_CITIES = {"train": ("synthberg", "synthstadt"), "val": ("synthfurt",)}
_COLOURS = {  # label name: (base RGB, per-pixel noise sigma)
    "unlabeled": ((105, 95, 80), 20), "road": ((80, 80, 88), 8), "sidewalk": ((175, 150, 160), 10),
    "building": ((125, 110, 95), 10), "vegetation": ((55, 115, 40), 28), "sky": ((140, 185, 235), 5),
    "person": ((200, 45, 70), 12), "car": ((35, 45, 150), 10),
}
_ID = {name: name2label[name].id for name in _COLOURS}


def _ellipse(shape, centre_y, centre_x, radius_y, radius_x) -> np.ndarray:
    y, x = np.ogrid[:shape[0], :shape[1]]
    return ((y - centre_y) / radius_y) ** 2 + ((x - centre_x) / radius_x) ** 2 < 1


class _Canvas:
    """A label-id map and a colour image painted together, far objects first."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.ids = np.full((height, width), _ID["unlabeled"], dtype=np.uint8)
        self.colour = np.tile(np.array(_COLOURS["unlabeled"][0], dtype=np.float32), (height, width, 1))

    def paint(self, region, name: str, tint: float = 8) -> None:
        """Label ``region`` as ``name``, in its base colour shifted by a random shade (mostly grey)."""
        shade = self.rng.normal(0, tint) + self.rng.normal(0, tint / 3, 3)
        self.ids[region] = _ID[name]
        self.colour[region] = np.array(_COLOURS[name][0]) + shade

    def render(self) -> np.ndarray:
        sigma = np.zeros(256, dtype=np.float32)
        for name, (_, noise) in _COLOURS.items():
            sigma[_ID[name]] = noise
        noise = self.rng.normal(0, 1, self.colour.shape) * sigma[self.ids][..., None]
        return np.clip(self.colour * self.rng.uniform(0.8, 1.2) + noise, 0, 255).astype(np.uint8)


def _street_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its label ids: sky, buildings, trees, road and sidewalks in perspective, cars, people."""
    canvas = _Canvas(rng, height, width)
    horizon = int(height * rng.uniform(0.38, 0.5))
    canvas.paint(np.s_[:horizon], "sky", tint=10)
    canvas.colour[:horizon] *= np.linspace(0.85, 1.1, horizon)[:, None, None]
    left = 0
    while left < width:
        right = min(width, left + int(rng.uniform(0.08, 0.25) * width))
        top = int(rng.uniform(0.05, 0.75) * horizon)
        canvas.paint(np.s_[top:horizon, left:right], "building", tint=25)
        rows, cols = np.ogrid[top:horizon, left:right]
        windows = ((rows - top) % 12 < 5) & ((cols - left) % 10 < 4)
        canvas.colour[top:horizon, left:right][windows] *= 0.55
        left = right + int(rng.uniform(0, 0.05) * width)
    for _ in range(rng.integers(1, 4)):
        canvas.paint(_ellipse(canvas.ids.shape, horizon - height * rng.uniform(0, 0.1), rng.uniform(0, width),
                              height * rng.uniform(0.08, 0.18), width * rng.uniform(0.04, 0.1)), "vegetation")

    rows, cols = np.ogrid[:height, :width]
    depth = np.clip((rows - horizon) / (height - horizon), 0, None)  # 0 at the horizon, 1 at the bottom row
    vanish_x = width * rng.uniform(0.35, 0.65)
    offset = np.abs(cols - vanish_x)
    below = (rows >= horizon) & (offset < depth * width * rng.uniform(0.8, 1.1))
    canvas.paint(below, "sidewalk")
    canvas.paint(below & (offset < depth * width * rng.uniform(0.45, 0.6)), "road")

    objects = [("car", d) for d in rng.uniform(0.15, 0.9, rng.integers(1, 5))]
    objects += [("person", d) for d in rng.uniform(0.15, 0.9, rng.integers(1, 4))]
    for name, d in sorted(objects, key=lambda o: o[1]):
        bottom = horizon + d * (height - horizon)
        side = rng.choice([-1, 1])
        if name == "car":
            radius_x = 0.12 * width * d
            centre_x = vanish_x + side * rng.uniform(0.1, 0.35) * width * d
            canvas.paint(_ellipse(canvas.ids.shape, bottom - 0.4 * radius_x, centre_x, 0.45 * radius_x, radius_x),
                         name, tint=30)
        else:
            radius_y = 0.25 * (height - horizon) * d + 4
            centre_x = vanish_x + side * rng.uniform(0.65, 0.9) * width * d
            body = _ellipse(canvas.ids.shape, bottom - radius_y, centre_x, radius_y, 0.3 * radius_y)
            head = _ellipse(canvas.ids.shape, bottom - 2.1 * radius_y, centre_x, 0.2 * radius_y, 0.2 * radius_y)
            canvas.paint(body | head, name, tint=25)
    return canvas.render(), canvas.ids


def _write_builtin(root: Path, counts: dict[str, int], size: tuple[int, int], seed: int) -> None:
    sample = 0
    for split, count in counts.items():
        cities = BUILTIN_CITIES[split]
        for frame in tqdm(range(count), desc=f"writing the built-in Cityscapes-layout {split}", unit="image"):
            city = cities[frame % len(cities)]
            stem = f"{city}_000000_{frame:06d}"
            image, ids = _street_scene(np.random.default_rng([seed, sample]), *size)
            sample += 1
            image_dir, label_dir = (root / kind / split / city for kind in ("leftImg8bit", "gtFine"))
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_dir / f"{stem}{IMAGE_SUFFIX}")
            Image.fromarray(ids).save(label_dir / f"{stem}{LABEL_SUFFIX}")
            Image.fromarray(ID_TO_TRAIN_ID[ids]).save(label_dir / f"{stem}_gtFine_labelTrainIds.png")
            Image.fromarray(PALETTE[ID_TO_TRAIN_ID[ids]]).save(label_dir / f"{stem}_gtFine_color.png")


def builtin_cityscapes(root: str | Path | None = None, num_train: int = 60, num_val: int = 12,
                       size: tuple[int, int] = (256, 512), seed: int = 0) -> Path:
    """Generate (once) street scenes in the exact Cityscapes layout and naming, and return their root.

    Label files hold real label ids (road 7, sidewalk 8, building 11, vegetation 21, sky 23, person 24, car 26,
    unlabeled 0), plus ``_gtFine_labelTrainIds.png`` and ``_gtFine_color.png``. ``size`` is (height, width). The
    default root is ``$MBBACKBONES_DATA/builtin_cityscapes`` (``~/.cache/mbbackbones`` without the variable).
    Writing goes through a temporary folder renamed into place, so readers never see a partial set.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "builtin_cityscapes"
    settings = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    return generated_once(root, settings, lambda folder: _write_builtin(folder, {"train": num_train, "val": num_val},
                                                                       tuple(size), seed), "Cityscapes")
