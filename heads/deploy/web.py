"""A static web page that runs an exported ``.onnx`` file in the browser with onnxruntime-web (WebAssembly).

:func:`write_page` writes into a folder: the page (``index.html``, ``app.js``, ``style.css``: this package's
``web/`` files), the model file, ``model.json`` (the file's metadata and the colours to draw with) and
onnxruntime-web's browser files (:data:`ORT_WEB_FILES`, from the npm package :data:`ORT_WEB_VERSION`, so the page
needs no network). Served over HTTP (``python -m http.server -d FOLDER``), the page takes a chosen or dropped
photo, ``?image=URL``, or the webcam; resizes it to the model's input as :class:`heads.Predictor` does (torch's
uint8 bilinear, in fixed point: the same pixels); runs the model; and draws and lists the detections or the mask,
with the results as JSON in ``<pre id="results">``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from mbbackbones.choices import ArgumentError

from ..data import default_data_root
from ..results import DRAW_SCORE
from ..visualize import class_colour, class_palette
from .runtimes import format_of, read_metadata

ORT_WEB_VERSION = "1.31.1"
ORT_WEB_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")  # the ES module and its WebAssembly
PAGE_FILES = ("index.html", "app.js", "style.css")
TEMPLATES = Path(__file__).with_name("web")


def copy_onnxruntime_web(folder: Path, source: str | Path | None = None) -> None:
    """Copy :data:`ORT_WEB_FILES` (MIT-licensed) into ``folder``, from ``source`` (an unpacked
    onnxruntime-web package, its ``dist`` folder, or its ``.tgz`` from ``npm pack``), else from the cache
    (``$MBBACKBONES_DATA/onnxruntime-web-<version>``), filled once by ``npm pack onnxruntime-web@<version>``; a
    one-line :class:`ArgumentError` naming the fix where neither works."""
    if source is None:
        source = default_data_root() / f"onnxruntime-web-{ORT_WEB_VERSION}"
        if not all((source / name).is_file() for name in ORT_WEB_FILES):
            _npm_pack(source)
    source = Path(source)
    if source.is_file():
        _unpack(source, folder)
        return
    for dist in (source, source / "dist", source / "package" / "dist"):
        if all((dist / name).is_file() for name in ORT_WEB_FILES):
            if folder.exists() and dist.samefile(folder):
                return
            for name in ORT_WEB_FILES:
                shutil.copyfile(dist / name, folder / name)
            return
    raise ArgumentError(f"--onnxruntime-web {source}: holds none of {', '.join(ORT_WEB_FILES)} (in itself, dist/ or "
                        f"package/dist/); give the onnxruntime-web {ORT_WEB_VERSION} package folder or its .tgz")


def _npm_pack(folder: Path) -> None:
    """onnxruntime-web's browser files unpacked into ``folder`` from the package npm downloads."""
    fix = (f"or pass --onnxruntime-web with an onnxruntime-web {ORT_WEB_VERSION} package (folder or .tgz from "
           f"'npm pack onnxruntime-web@{ORT_WEB_VERSION}')")
    npm = shutil.which("npm")
    if npm is None:
        raise ArgumentError(f"the web page needs onnxruntime-web from npm, and npm is not installed: install Node.js "
                            f"(npm), {fix}")
    with tempfile.TemporaryDirectory(prefix="onnxruntime-web-") as tmp:
        try:
            done = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--pack-destination", tmp],
                                  capture_output=True, text=True, timeout=600)
            failed, reason = done.returncode != 0, f"exit status {done.returncode}"
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else reason
        except subprocess.TimeoutExpired:
            failed, reason = True, "no answer in 600 s"
        packed = sorted(Path(tmp).glob("*.tgz"))
        if failed or not packed:
            raise ArgumentError(f"npm pack onnxruntime-web@{ORT_WEB_VERSION} failed ({reason}): check the network and "
                                f"npm's registry, {fix}")
        _unpack(packed[0], folder)


def _unpack(tarball: Path, folder: Path) -> None:
    """:data:`ORT_WEB_FILES` of an onnxruntime-web ``.tgz`` into ``folder``."""
    wanted = {f"package/dist/{name}": name for name in ORT_WEB_FILES}
    try:
        with tarfile.open(tarball) as archive:
            members = {member.name: member for member in archive.getmembers() if member.name in wanted}
            missing = [name for path, name in wanted.items() if path not in members]
            if missing:
                raise ArgumentError(f"{tarball} is not an onnxruntime-web package: it lacks {', '.join(missing)}")
            folder.mkdir(parents=True, exist_ok=True)
            for path, member in members.items():
                staged = folder / f".{wanted[path]}.part"
                with archive.extractfile(member) as source, open(staged, "wb") as target:
                    shutil.copyfileobj(source, target)
                staged.replace(folder / wanted[path])
    except tarfile.TarError as error:
        raise ArgumentError(f"{tarball} is not a readable .tgz ({error}): give the file 'npm pack' writes") from None


def page_config(model_path: Path) -> dict:
    """What the page reads from ``model.json``: the model file's name, its metadata, a colour per class for boxes
    (:func:`~heads.visualize.class_colour`) and for masks (:func:`~heads.visualize.class_palette`), the score from
    which boxes are drawn, and the largest image a file of any size is run at
    (:data:`heads.segmentation.lraspp.MAX_PIXELS`, as the Predictor)."""
    from ..segmentation.lraspp import MAX_PIXELS

    metadata = read_metadata(model_path)
    if format_of(model_path) != "onnx" or not metadata.get("postprocessed"):
        raise ArgumentError(f"{model_path}: the web page runs .onnx files with the post-processing inside (the "
                            "default of tools/export.py; not --raw)")
    categories = metadata["categories"]
    return {"model": model_path.name, "metadata": metadata, "max_pixels": MAX_PIXELS,
            "draw_score": metadata.get("draw_score", DRAW_SCORE),
            "colours": [class_colour(label) for label in range(len(categories))],
            "palette": class_palette(categories)[:len(categories)].tolist()}


def write_page(model_path: str | Path, folder: str | Path, onnxruntime: str | Path | None = None) -> Path:
    """Write the demo page of an exported ``.onnx`` file into ``folder`` (see the module's doc; the model is copied
    there unless it is there already); ``onnxruntime``: see :func:`copy_onnxruntime_web`. Returns the page."""
    model_path, folder = Path(model_path), Path(folder)
    config = page_config(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    copy_onnxruntime_web(folder, onnxruntime)
    if not (folder / model_path.name).exists() or not (folder / model_path.name).samefile(model_path):
        shutil.copyfile(model_path, folder / model_path.name)
    (folder / "model.json").write_text(json.dumps(config))
    for name in PAGE_FILES:
        shutil.copyfile(TEMPLATES / name, folder / name)
    return folder / "index.html"
