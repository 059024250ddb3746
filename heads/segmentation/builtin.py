"""The built-in segmentation datasets: street scenes in the exact Cityscapes layout and naming, and shapes on
textured backgrounds as image and mask folders of three named classes."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image
from tqdm import tqdm

from ..data import default_data_root, generated_once
from ..voc import palette
from .cityscapes import ID_TO_TRAIN_ID, IMAGE_SUFFIX, LABEL_SUFFIX, PALETTE
from .masks import IGNORE_INDEX

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



# -- the built-in masks set: shapes on textured backgrounds, three named classes ----------------------------------

MASK_CLASSES = ("background", "disk", "stripe")
_BORDER = 1.0  # half-width in pixels of the ignore (255) ring drawn around each disk, as Pascal VOC marks borders


def _colour(rng: np.random.Generator, hues: tuple[float, float], saturation: tuple[float, float]) -> np.ndarray:
    hue = rng.uniform(*hues) % 1.0
    return 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(0.45, 1.0)))


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float RGB background of any hue, muted: two colours mixed by smooth noise or in a checkerboard, plus
    grain."""
    low, high = (_colour(rng, (0, 1), (0.0, 0.35)) for _ in range(2))
    if rng.random() < 0.7:
        cells = rng.random((rng.integers(2, 6), rng.integers(2, 6)))
        weight = np.asarray(Image.fromarray(cells.astype(np.float32)).resize((width, height), Image.BICUBIC))
        weight = np.clip(weight, 0, 1)
    else:
        square = int(rng.integers(6, 20))
        rows, cols = np.ogrid[:height, :width]
        weight = ((rows // square + cols // square) % 2).astype(np.float32)
    grain = rng.normal(0, rng.uniform(3, 15), (height, width, 3))
    return low + (high - low) * weight[..., None] + grain


def _shapes_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its class ids: stripes crossing a textured background, disks over them, each disk outlined
    by an ignore ring."""
    image = _texture(rng, height, width)
    ids = np.zeros((height, width), dtype=np.uint8)
    rows, cols = np.ogrid[:height, :width]
    short = min(height, width)
    for _ in range(rng.choice([0, 1, 1, 2])):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * short
        distance = (cols - width / 2) * np.cos(angle) + (rows - height / 2) * np.sin(angle) - offset
        band = np.abs(distance) < rng.uniform(0.04, 0.09) * short
        ids[band] = MASK_CLASSES.index("stripe")
        image[band] = _colour(rng, (0.3, 0.7), (0.4, 1.0)) + rng.normal(0, 4, (band.sum(), 3))  # greens, blues
    for _ in range(rng.choice([0, 1, 2, 3, 4])):
        radius = rng.uniform(0.08, 0.22) * short
        centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
        distance = np.hypot(rows - centre_y, cols - centre_x)
        disk = distance < radius
        shade = 1 - 0.3 * (distance[disk] / radius) ** 2  # lit from the front
        ids[disk] = MASK_CLASSES.index("disk")
        colour = _colour(rng, (-0.1, 0.2), (0.4, 1.0))  # reds, oranges, yellows
        image[disk] = colour * shade[:, None] + rng.normal(0, 4, (disk.sum(), 3))
        ids[np.abs(distance - radius) < _BORDER] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), ids


def _write_masks(root: Path, counts: dict[str, int], size_range: tuple[int, int], seed: int) -> None:
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in MASK_CLASSES))
    colours = palette().ravel().tolist()
    sample = 0
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for index in tqdm(range(count), desc=f"writing the built-in masks {split}", unit="image"):
            rng = np.random.default_rng([seed, sample])
            sample += 1
            image, ids = _shapes_scene(rng, *rng.integers(size_range[0], size_range[1] + 1, 2))
            suffix = ".png" if index % 5 == 4 else ".jpg"  # mostly JPEG photos, some PNG ones: pairing is by stem
            Image.fromarray(image).save(root / "images" / split / f"{index:04d}{suffix}", quality=92)
            mask = Image.fromarray(ids)
            if index % 2 == 0:  # every other mask a palette PNG, as Pascal VOC stores them
                mask = mask.convert("P")
                mask.putpalette(colours)
            mask.save(root / "masks" / split / f"{index:04d}.png")


def builtin_masks(root: str | Path | None = None, num_train: int = 160, num_val: int = 40,
                  size_range: tuple[int, int] = (112, 176), seed: int = 0) -> Path:
    """Generate (once) a masks dataset of three named classes and return its root::

        root/classes.txt                    background, disk, stripe (one name a line)
        root/images/{train,val}/0000.jpg    RGB photos (every fifth a PNG)
        root/masks/{train,val}/0000.png     class ids 0..2, 255 on a ring around each disk (ignore)

    Warm disks and cool stripes (hues that overlap at the edges of their ranges) over muted textured backgrounds
    of any hue; every other mask is a palette PNG (Pascal VOC's colours, read as indices), the others
    grayscale. Heights and widths are drawn from ``size_range``. The default root is
    ``$MBBACKBONES_DATA/builtin_masks``; an existing set made with the same arguments is reused.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "builtin_masks"
    settings = {"num_train": num_train, "num_val": num_val, "size_range": list(size_range), "seed": seed}
    return generated_once(root, settings, lambda folder: _write_masks(
        folder, {"train": num_train, "val": num_val}, tuple(size_range), seed), "masks")
