"""The web page of ``tools/export.py --web``: served on 127.0.0.1 and opened in headless Chromium (driven over the
DevTools protocol on a pipe), it runs the .onnx file with onnxruntime-web and reports what ``heads.Predictor`` finds
in the same photo, on the file and on PyTorch."""
import base64
import functools
import json
import os
import select
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import REAL, unavailable
from PIL import Image
from test_postprocessed import trained_like  # noqa: F401  (a fixture)
from test_runtimes import SEGMENTER, SIZES, models  # noqa: F401  (a fixture)

from heads.assets import SAMPLE_IMAGES
from heads.cli import export_main
from heads.data import read_image
from heads.deploy import runtimes, web
from heads.deploy.predictor import Predictor
from heads.detection.ssdlite import detection_agreement
from mbbackbones.choices import ArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")
DETECTOR = "ssdlite320_mbv3_large_reduced"  # the trained-like detector's
# the top 100 either way, same label; scores within 1e-4 and boxes within 2e-2 photo pixels (1e-2 input pixels
# scaled to 640x427): what fp32 on another CPU's kernels (WebAssembly SIMD) keeps
TOP, TOLERANCE, BOX_TOLERANCE = 100, 1e-4, 2e-2
MASK_AGREEMENT = 0.99
WAIT_S = 120  # for the page's result


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in
    NUL on file descriptors 3 and 4), one page."""

    def __init__(self, executable: str):
        ours_in, theirs_out = os.pipe()
        theirs_in, ours_out = os.pipe()

        def as_3_and_4():  # in the child, before the descriptors not passed are closed
            read, write = os.dup(theirs_in), os.dup(theirs_out)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=as_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(theirs_in)
        os.close(theirs_out)
        self.reader, self.writer, self.buffer, self.id = ours_in, ours_out, b"", 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=1200, height=680, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self.id += 1
        message = {"id": self.id, "method": method, "params": params}
        if getattr(self, "session", None):
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                if not select.select([self.reader], [], [], WAIT_S)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {WAIT_S} s")
                chunk = os.read(self.reader, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def results(self, url: str) -> dict:
        """Open ``url`` and wait for the page's results (``<pre id="results">``, once ``body[data-state]`` says
        done or error)."""
        self.send("Page.navigate", url=url)
        wait = f"""new Promise((done, fail) => {{
            const start = Date.now();
            const check = () => {{
                const state = document.body && document.body.dataset.state;
                if (location.href === {json.dumps(url)} && (state === "done" || state === "error"))
                    done(document.getElementById("results").textContent);
                else if (Date.now() - start > {WAIT_S * 1000}) fail(new Error("no result, page state " + state));
                else setTimeout(check, 20);
            }};
            check();
        }})"""
        reply = self.send("Runtime.evaluate", expression=wait, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{url}: {reply['exceptionDetails']}")
        return json.loads(reply["result"]["value"])

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.reader)
        os.close(self.writer)


@pytest.fixture(scope="module")
def chromium():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        unavailable("chromium is not installed (Debian: apt-get install chromium)")
    browser = Chromium(executable)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def onnxruntime_web(tmp_path_factory):
    """onnxruntime-web's browser files (npm pack, cached under $MBBACKBONES_DATA)."""
    folder = tmp_path_factory.mktemp("onnxruntime-web")
    try:
        web.copy_onnxruntime_web(folder)
    except ArgumentError as error:
        unavailable(f"no onnxruntime-web: {error}")
    return folder


@pytest.fixture
def serve():
    """``serve(folder)``: the folder over HTTP on 127.0.0.1 (a thread), its URL."""
    servers = []

    def start(folder) -> str:
        handler = functools.partial(Quiet, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def as_tensors(detections: list[dict]) -> dict:
    return {"boxes": torch.tensor([d["box"] for d in detections], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float32),
            "labels": torch.tensor([d["label"] for d in detections], dtype=torch.long)}


def test_page_detects_as_the_predictor(trained_like, chromium, onnxruntime_web, serve, tmp_path, capsys):  # noqa: F811
    """tools/export.py --web writes the page; on real photos (colour and grayscale JPEGs) it reports the
    Predictor's detections, on the .onnx file and on PyTorch, boxes in photo pixels."""
    model = trained_like[0]
    weights, page = tmp_path / "detector.pth", tmp_path / "page"
    torch.save(model.state_dict(), weights)
    files = export_main(["--weights", str(weights), "--model", DETECTOR, "--device", "cpu", "--out",
                         str(tmp_path / "detector.onnx"), "--web", str(page),
                         "--onnxruntime-web", str(onnxruntime_web)])
    assert page / "index.html" in files and "python -m http.server" in capsys.readouterr().out
    assert {"index.html", "app.js", "model.json", "detector.onnx", *web.ORT_WEB_FILES} <= set(os.listdir(page))
    url = serve(page)
    on_file, on_torch, found = Predictor(tmp_path / "detector.onnx"), Predictor(model, device="cpu"), []
    for photo in [*SAMPLE_IMAGES.values(), REAL / "gray.jpg"]:
        shutil.copy(photo, page)
        reported = chromium.results(f"{url}/index.html?image={photo.name}")
        assert "error" not in reported, reported
        height, width = read_image(photo).shape[:2]
        assert (reported["height"], reported["width"], reported["input_size"]) == (height, width, [320, 320])
        assert [d["name"] for d in reported["detections"]] == [model.meta["categories"][d["label"]]
                                                               for d in reported["detections"]]
        got = as_tensors(reported["detections"])
        for predictor in (on_file, on_torch):
            expected = predictor(photo)[0]
            expected = {"boxes": expected.boxes, "scores": expected.scores, "labels": expected.labels}
            assert len(got["labels"]) == len(expected["labels"]), photo.name
            shares = [detection_agreement(a, b, TOP, tolerance=TOLERANCE, box_tolerance=BOX_TOLERANCE)
                      for a, b in ((expected, got), (got, expected))]
            assert min(shares) == 1, (photo.name, shares)
            found.append(len(got["labels"]))
    assert min(found[:2]) > 0, found  # the colour photos have detections


def test_page_segments_as_the_predictor(models, chromium, onnxruntime_web, serve, tmp_path):  # noqa: F811
    """A segmenter's page reports the Predictor's mask (on the file and on PyTorch) on a street photo."""
    model = models[SEGMENTER]
    page = tmp_path / "page"
    path = runtimes.export(model, tmp_path / "segmenter.onnx", size=SIZES[SEGMENTER])
    web.write_page(path, page, onnxruntime_web)
    photo = page / "street.png"  # a quarter of the Cityscapes photo's width: seconds on one WebAssembly thread
    Image.open(REAL / "cityscapes_sample/leftImg8bit/frankfurt_000000_000294_leftImg8bit.png").convert("RGB").resize(
        (384, 192), Image.Resampling.BILINEAR).save(photo)
    reported = chromium.results(f"{serve(page)}/index.html?image={photo.name}")
    assert "error" not in reported, reported
    mask = np.frombuffer(base64.b64decode(reported["mask"]["data"]), np.uint8).reshape(192, 384)
    shares = {entry["label"]: entry["share"] for entry in reported["classes"]}
    assert shares == pytest.approx({label: (mask == label).mean() for label in np.unique(mask).tolist()})
    for predictor in (Predictor(path), Predictor(model, device="cpu")):
        agreement = (predictor(photo)[0].mask == mask).mean()
        assert agreement >= MASK_AGREEMENT


def test_page_errors(models, tmp_path, monkeypatch, capsys):  # noqa: F811
    """One line naming the fix: a raw graph, a folder without onnxruntime-web, no npm."""
    model = models[SEGMENTER]
    raw = runtimes.export(model, tmp_path / "raw.onnx", size=SIZES[SEGMENTER], postprocess=False)
    with pytest.raises(ArgumentError, match="post-processing inside"):
        web.write_page(raw, tmp_path / "page", tmp_path)
    with pytest.raises(ArgumentError, match="holds none of ort.wasm.bundle.min.mjs"):
        web.copy_onnxruntime_web(tmp_path / "page", tmp_path)
    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path / "empty cache"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ArgumentError, match=r"npm is not installed: install Node.js \(npm\), or pass --onnxrun"):
        web.copy_onnxruntime_web(tmp_path / "page")
    with pytest.raises(SystemExit):
        export_main(["--backbone", "mbv3_small_reduced", "--out", str(tmp_path / "b.xml"), "--web", str(tmp_path)])
    assert capsys.readouterr().err == ("error: --web runs .onnx files with the post-processing inside: export to "
                                       ".onnx without --raw\n")
