// The demo page of an mbbackbones .onnx file (written by tools/export.py --web): a photo (chosen, dropped,
// ?image=URL) or the webcam in, resized as heads.Predictor resizes, run by onnxruntime-web, results drawn and listed.
import * as ort from "./ort.wasm.bundle.min.mjs";

const $ = (id) => document.getElementById(id);
const config = await (await fetch("model.json")).json();
const meta = config.metadata;
const settings = meta.postprocess || {};
// Threads need SharedArrayBuffer, which browsers give only to cross-origin-isolated pages (COOP/COEP headers);
// a plain static server (python -m http.server) gets one thread.
const threads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
ort.env.wasm.numThreads = threads;

// -- resize: torch's uint8 bilinear (align_corners=False), as heads.Predictor runs it --------------------------------

// One axis of torch's int16 fixed-point weights (UpSampleKernel.cpp, _compute_index_ranges_int16_weights): per output
// index the first source index and its taps, at the precision where the largest weight still fits in 15 bits.
function axisTaps(inSize, outSize) {
  const scale = inSize / outSize;
  const starts = [], taps = [];
  let largest = 0;
  for (let i = 0; i < outSize; i++) {
    const center = scale * (i + 0.5);
    const first = Math.max(Math.trunc(center - 1 + 0.5), 0);
    const size = Math.min(Math.trunc(center + 1 + 0.5), inSize) - first;
    const weights = [];
    let total = 0;
    for (let j = 0; j < size; j++) {
      const weight = Math.max(0, 1 - Math.abs(j + first - center + 0.5));
      weights.push(weight);
      total += weight;
    }
    for (let j = 0; j < size; j++) {
      weights[j] /= total;
      largest = Math.max(largest, weights[j]);
    }
    starts.push(first);
    taps.push(weights);
  }
  let precision = 0;
  while (precision < 22 && Math.trunc(0.5 + largest * 2 ** (precision + 1)) < 2 ** 15) precision++;
  const scaled = taps.map((weights) => weights.map((w) => Math.trunc(0.5 + w * 2 ** precision)));
  return { starts, taps: scaled, precision };
}

// One pass along an axis of an image [rows, columns, channels] (strides given), rounding to uint8 as torch does.
function pass(source, outCount, inCount, lines, channels, along, across, outAlong, outAcross) {
  const { starts, taps, precision } = axisTaps(inCount, outCount);
  const half = 2 ** (precision - 1), shift = 2 ** precision;
  const out = new Uint8Array(outCount * lines * channels);
  for (let o = 0; o < outCount; o++) {
    const first = starts[o], weights = taps[o];
    for (let line = 0; line < lines; line++) {
      for (let c = 0; c < channels; c++) {
        let sum = half;
        for (let j = 0; j < weights.length; j++) sum += weights[j] * source[(first + j) * along + line * across + c];
        out[o * outAlong + line * outAcross + c] = Math.min(255, Math.max(0, Math.floor(sum / shift)));
      }
    }
  }
  return out;
}

// RGBA pixels [height, width, 4] -> RGB uint8 [outHeight, outWidth, 3]: the width first, then the height.
function resize(rgba, height, width, outHeight, outWidth) {
  let rgb = new Uint8Array(height * width * 3);
  for (let i = 0, k = 0; i < height * width; i++) {
    rgb[k++] = rgba[4 * i];
    rgb[k++] = rgba[4 * i + 1];
    rgb[k++] = rgba[4 * i + 2];
  }
  if (outWidth !== width) rgb = pass(rgb, outWidth, width, height, 3, 3, width * 3, 3, outWidth * 3);
  if (outHeight !== height) rgb = pass(rgb, outHeight, height, outWidth, 3, outWidth * 3, 3, outWidth * 3, 3);
  return rgb;
}

function pythonRound(x) {  // Python's round(): halves to even
  const floor = Math.floor(x), rest = x - floor;
  return rest > 0.5 || (rest === 0.5 && floor % 2 === 1) ? floor + 1 : floor;
}

// The (height, width) the model takes a photo at (the model classes' input_size, from the file's metadata).
function inputSize(height, width) {
  if (meta.input_size) return meta.input_size;
  if (meta.resize) {
    const scale = meta.resize / Math.min(height, width);
    return [pythonRound(height * scale), pythonRound(width * scale)];
  }
  if (height * width > config.max_pixels) {
    const scale = Math.sqrt(config.max_pixels / (height * width));
    return [Math.trunc(height * scale), Math.trunc(width * scale)];
  }
  return [height, width];
}

// -- the model's outputs as results in photo pixels ------------------------------------------------------------------

function detections(outputs, height, width, size) {
  const count = Number(outputs.count.data[0]);
  const boxes = outputs.boxes.data, scores = outputs.scores.data, labels = outputs.labels.data;
  const scaleX = Math.fround(width / size[0]), scaleY = Math.fround(height / size[0]);  // float32, as the Predictor
  const found = [];
  for (let i = 0; i < count && found.length < settings.detections_per_img; i++) {
    if (!(scores[i] > settings.score_thresh)) continue;
    const label = Number(labels[i]);
    found.push({
      label, name: meta.categories[label], score: scores[i],
      box: [0, 1, 2, 3].map((k) => Math.fround(boxes[4 * i + k] * (k % 2 ? scaleY : scaleX))),
    });
  }
  return { detections: found };
}

function segmentation(outputs, height, width) {
  const [, maskHeight, maskWidth] = outputs.mask.dims;
  const small = outputs.mask.data;
  // torch's nearest-exact in float32: source index floor((i + 0.5) * in / out)
  const index = (out, inSize) => {
    const scale = Math.fround(inSize / out);
    return Array.from({ length: out }, (_, i) => Math.min(Math.floor(Math.fround((i + 0.5) * scale)), inSize - 1));
  };
  const rows = index(height, maskHeight), columns = index(width, maskWidth);
  const mask = new Uint8Array(height * width);
  const counts = new Array(meta.categories.length).fill(0);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const label = small[rows[y] * maskWidth + columns[x]];
      mask[y * width + x] = label;
      counts[label]++;
    }
  }
  const classes = counts.map((pixels, label) => ({ label, name: meta.categories[label], share: pixels / mask.length }))
    .filter((entry) => entry.share > 0).sort((a, b) => b.share - a.share);
  let binary = "";
  for (let i = 0; i < mask.length; i += 0x8000) binary += String.fromCharCode(...mask.subarray(i, i + 0x8000));
  return { classes, mask: { encoding: "base64 uint8 [height, width]", data: btoa(binary) }, pixels: mask };
}

// -- drawing -------------------------------------------------------------------------------------------------------

const rgb = (colour) => `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
const textColour = ([r, g, b]) => (0.299 * r + 0.587 * g + 0.114 * b > 140 ? "black" : "white");  // as heads.visualize

function drawDetections(context, found, height, width) {
  const short = Math.min(height, width);
  const line = Math.max(2, Math.floor(short / 160)), fontSize = Math.max(12, Math.floor(short / 32));
  context.lineWidth = line;
  context.font = `bold ${fontSize}px DejaVu Sans, system-ui, sans-serif`;
  context.textBaseline = "top";
  const drawn = found.filter((d) => d.score >= config.draw_score);
  for (const d of [...drawn].reverse()) {  // the best on top
    const colour = config.colours[d.label];
    const [x1, y1, x2, y2] = d.box;
    context.strokeStyle = rgb(colour);
    context.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const caption = `${d.name} ${d.score.toFixed(2)}`;
    const textWidth = context.measureText(caption).width + 2 * line;
    const top = y1 - fontSize - 2 * line >= 0 ? y1 - fontSize - 2 * line : y1;
    context.fillStyle = rgb(colour);
    context.fillRect(x1 - line / 2, top, textWidth, fontSize + 2 * line);
    context.fillStyle = textColour(colour);
    context.fillText(caption, x1 + line / 2, top + line);
  }
  return drawn.length;
}

function drawMask(context, mask, height, width) {
  const image = context.getImageData(0, 0, width, height);
  const pixels = image.data;
  for (let i = 0; i < mask.length; i++) {
    const colour = config.palette[mask[i]];
    for (let c = 0; c < 3; c++) pixels[4 * i + c] = Math.round(0.5 * pixels[4 * i + c] + 0.5 * colour[c]);
  }
  context.putImageData(image, 0, 0);
}

function list(result) {  // the detections drawn (the JSON has all), or the classes by area
  const drawn = result.detections && result.detections.filter((d) => d.score >= config.draw_score);
  const items = result.detections
    ? drawn.map((d) => [config.colours[d.label], d.name, d.score.toFixed(2),
      `box ${d.box.map((v) => v.toFixed(0)).join(", ")} (x1, y1, x2, y2)`])
    : result.classes.map((c) => [config.palette[c.label], c.name,
      c.share < 0.001 ? "<0.1%" : `${(100 * c.share).toFixed(1)}%`, ""]);
  $("list").replaceChildren(...items.map(([colour, name, score, box]) => {
    const item = document.createElement("li");
    item.innerHTML = `<span class="swatch" style="background:${rgb(colour)}"></span>${name}` +
      `<span class="score">${score}</span>`;
    item.title = box;
    return item;
  }));
  if (!items.length) $("list").innerHTML = "<li>nothing found</li>";
  const more = result.detections ? result.detections.length - drawn.length : 0;
  $("more").textContent = more ? `and ${more} more scoring under ${config.draw_score} (in the JSON)` : "";
}

// -- one photo or frame --------------------------------------------------------------------------------------------

let busy = false;

async function predict(source, width, height, name) {
  const canvas = $("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(source, 0, 0, width, height);
  const start = performance.now();
  const size = inputSize(height, width);
  const input = resize(context.getImageData(0, 0, width, height).data, height, width, size[0], size[1]);
  const resized = performance.now();
  const outputs = await session.run({ images: new ort.Tensor("uint8", input, [1, size[0], size[1], 3]) });
  const ran = performance.now();
  const found = outputs.mask ? segmentation(outputs, height, width) : detections(outputs, height, width, size);
  const result = { image: name, width, height, input_size: size, ...found,
    ms: { resize: resized - start, model: ran - resized, total: performance.now() - start } };
  delete result.pixels;
  let shown;
  if (found.pixels) {
    drawMask(context, found.pixels, height, width);
    shown = `${result.classes.length} classes`;
  } else {
    const drawn = drawDetections(context, result.detections, height, width);
    shown = `${result.detections.length} detections (${drawn} drawn: score >= ${config.draw_score})`;
  }
  list(result);
  $("results").textContent = JSON.stringify(result);
  $("status").textContent = `${name}: ${shown}, ${result.ms.model.toFixed(0)} ms in the model`;
  document.body.dataset.state = "done";
  return result;
}

async function predictFile(blob, name) {
  if (busy) return;
  busy = true;
  try {
    $("status").textContent = `Running on ${name}…`;
    // the pixels as stored (colorSpaceConversion none, as Pillow reads them), turned upright by their EXIF orientation
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    await predict(bitmap, bitmap.width, bitmap.height, name);
  } catch (error) {
    fail(error);
  } finally {
    busy = false;
  }
}

function fail(error) {
  $("status").textContent = `Error: ${error.message || error}`;
  $("results").textContent = JSON.stringify({ error: String(error.message || error) });
  document.body.dataset.state = "error";
}

// -- webcam --------------------------------------------------------------------------------------------------------

let stream = null;

async function toggleCamera() {
  const button = $("camera");
  if (stream) {
    stream.getTracks().forEach((track) => track.stop());
    stream = null;
    button.textContent = "Webcam";
    button.classList.remove("on");
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
  } catch (error) {
    fail(new Error(`no webcam (${error.message}); a page needs https or localhost for one`));
    return;
  }
  button.textContent = "Stop";
  button.classList.add("on");
  const video = document.createElement("video");
  video.srcObject = stream;
  video.muted = true;
  await video.play();
  const live = stream;
  while (stream === live) {
    await predict(video, video.videoWidth, video.videoHeight, "webcam");
    await new Promise(requestAnimationFrame);
  }
}

// -- the page ------------------------------------------------------------------------------------------------------

$("title").textContent = meta.name;
$("subtitle").textContent = `${meta.task}, ${meta.categories.length} classes, ` +
  (meta.input_size ? `input ${meta.input_size[0]}×${meta.input_size[1]}` : "input at the photo's size") +
  `, ${meta.precision} ONNX`;
$("footer").textContent = `onnxruntime-web ${ort.env.versions?.web ?? ""} on WebAssembly, ${threads} thread` +
  (threads === 1 ? " (several need a cross-origin-isolated page: COOP/COEP headers, which a plain static " +
    "server such as python -m http.server does not send)" : "s") +
  ". Photos stay in this browser.";

let session;
try {
  session = await ort.InferenceSession.create(config.model, { executionProviders: ["wasm"] });
  $("status").textContent = "Ready: choose or drop a photo, or start the webcam.";
  document.body.dataset.state = "ready";
} catch (error) {
  fail(error);
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) predictFile(file, file.name);
});
$("camera").addEventListener("click", toggleCamera);
const stage = $("stage");
stage.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("over"); });
stage.addEventListener("dragleave", () => stage.classList.remove("over"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) predictFile(file, file.name);
});

const image = new URLSearchParams(location.search).get("image");
if (session && image) {
  const response = await fetch(image);
  if (response.ok) await predictFile(await response.blob(), image);
  else fail(new Error(`${image}: HTTP ${response.status}`));
}
