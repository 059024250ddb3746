import json
import os
import shutil
import signal
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from heads.detection.ssdlite import detection_agreement  # noqa: E402

RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch",
                    "tflite": "ai_edge_litert"}  # export format -> the package its tests import


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: small CPU runs go fastest so (and do not oversubscribe shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _default_sigchld():
    """Each test starts with the default SIGCHLD disposition. A DataLoader with workers leaves torch's SIGCHLD handler
    installed for the life of the process; after the deployment runtimes have run in the same process, a later child
    process's exit then crashes the interpreter (seen here: a segfault in an unrelated test's subprocess call)."""
    from torch.utils.data._utils import signal_handling

    yield
    if signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal_handling._SIGCHLD_handler_set = False  # the next DataLoader with workers installs it again


@pytest.fixture(scope="module")
def data_home(tmp_path_factory) -> Path:
    """Built-in datasets written under a temporary MBBACKBONES_DATA for one test module (the folder)."""
    home = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MBBACKBONES_DATA", str(home))
        yield home


def unavailable(reason: str) -> None:
    """A tool a test needs (a browser, a runtime's own environment) is missing: a skip here, a failure in CI, whose
    ``.ci/run`` installs it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def same_detections(expected: dict, actual: dict, tolerance: float = 1e-4, limit: int | None = None,
                    box_tolerance: float | None = None) -> bool:
    """The same set of detections (label, score within ``tolerance`` and box within ``box_tolerance`` pixels,
    :func:`detection_agreement` both ways): float noise may swap the order of near-equal scores. ``limit``: the
    detections-per-image cap; where ``expected`` reaches it, near-ties at the cut-off (float noise decides those) are
    not compared."""
    cutoff = expected["scores"][-1] + tolerance if limit is not None and len(expected["scores"]) == limit else -1.0
    above = lambda d: {key: d[key][d["scores"] > cutoff] for key in ("boxes", "scores", "labels")}  # noqa: E731
    return (detection_agreement(above(actual), expected, tolerance=tolerance, box_tolerance=box_tolerance) == 1 and
            detection_agreement(above(expected), actual, tolerance=tolerance, box_tolerance=box_tolerance) == 1)


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so that parity tests exercise them; likewise layer-scale
    factors (MobileNetV4 hybrids), whose initial 1e-5 would hide the branches they scale."""
    from timm.layers import LayerScale2d

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            elif isinstance(module, LayerScale2d):
                module.gamma.uniform_(0.1, 0.3)
    return model.eval()


REAL = Path(__file__).parent / "data" / "real"  # small real samples (see its README.md for sources and licences)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """A folder of three real photos: the package's samples (3dogs, kitten) and the grayscale kitten."""
    from heads.assets import SAMPLE_IMAGES

    folder = tmp_path_factory.mktemp("photos")
    for path in [*SAMPLE_IMAGES.values(), REAL / "gray.jpg"]:
        shutil.copy(path, folder)
    return folder


def write_coco(root: Path, images: dict, annotations: list, split="val2017") -> Path:
    """A COCO folder from ``{file_name: PIL image or raw bytes}`` and ``[(file_name, bbox, iscrowd)]``."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    records = []
    for image_id, (name, image) in enumerate(images.items(), start=1):
        if isinstance(image, bytes):
            (root / split / name).write_bytes(image)
            width, height = 64, 48
        else:
            image.save(root / split / name)
            width, height = image.size
        records.append({"id": image_id, "file_name": name, "width": width, "height": height})
    ids = {record["file_name"]: record["id"] for record in records}
    anns = [{"id": i, "image_id": ids[name], "category_id": 5, "bbox": bbox, "area": 1.0, "iscrowd": crowd}
            for i, (name, bbox, crowd) in enumerate(annotations, start=1)]
    dataset = {"images": records, "annotations": anns, "categories": [{"id": 5, "name": "thing"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))
    return root


def exif_jpeg(path: Path, orientation: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A JPEG of random pixels stored ``width`` x ``height`` with the EXIF orientation tag ``orientation`` (6: viewers
    turn it 90 degrees clockwise, as phones store portrait photos); returns its pixels as stored, decoded."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, exif=exif)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


MASK_NAMES = ("background", "lane", "curb")


def write_masks_set(root: Path, count: int = 4, size=(24, 32), seed: int = 0) -> dict:
    """A masks set in the real layout: JPEG and PNG images (a noisy colour per class), palette and grayscale PNG masks
    of ids 0..2 in 8 x 8 blocks with ignore pixels, a classes file (``size``: multiples of 8). Returns the folders
    and the class ids written, by stem."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    written = {}
    for index in range(count):
        stem = f"frame_{index:03d}"
        ids = np.kron(rng.integers(0, len(MASK_NAMES), (size[0] // 8, size[1] // 8)), np.ones((8, 8))).astype(np.uint8)
        ids[0, :5] = 255  # ignore
        ids[-1, -1] = 2
        mask = Image.fromarray(ids)
        if index % 2 == 0:  # a palette PNG whose colours say nothing of the ids: index 0 is white, 1 black
            mask = mask.convert("P")
            mask.putpalette([255, 255, 255, 0, 0, 0, 30, 200, 10] + [7] * (253 * 3))
        mask.save(masks / f"{stem}.png")
        colours = np.array([(90, 90, 90), (230, 230, 230), (200, 40, 40)] + [(0, 0, 0)] * 252 + [(90, 90, 90)])
        image = Image.fromarray(np.clip(colours[ids] + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8))
        image.save(images / f"{stem}{'.jpg' if index % 2 else '.png'}")
        written[stem] = ids
    (root / "classes.txt").write_text("\n".join(MASK_NAMES) + "\n")
    return {"images": images, "masks": masks, "classes": root / "classes.txt", "ids": written}
