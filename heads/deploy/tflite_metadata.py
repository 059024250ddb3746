"""Metadata inside a LiteRT (TFLite) file: ours (JSON) and TFLite Model Metadata, the one MediaPipe's tasks read.

A ``.tflite`` file is a flatbuffer whose ``metadata`` list names buffers: ``mbbackbones`` holds our JSON record,
``TFLITE_METADATA`` the TFLite Model Metadata (a flatbuffer of its own, file identifier ``M001``) where the graph
follows an app task's convention (:class:`AppMetadata`, from the task model's ``app_metadata``). Label files go in a
zip archive appended to the file, as TFLite's metadata populator writes them, which LiteRT ignores.

The TFLite Model Metadata flatbuffer is written here with the ``flatbuffers`` builder (a dependency of
ai-edge-litert): the schema's Python module ships with no package our environment can install (MediaPipe's
clashes with albumentations' OpenCV, tflite-support needs protobuf 3). The fields and their slots are those of
MediaPipe's ``metadata_schema.fbs`` (schema 1.5.0); the test reads the file back with MediaPipe itself.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

JSON_KEY = "mbbackbones"
TFLITE_METADATA = "TFLITE_METADATA"
# union tags of the schema's ContentProperties and ProcessUnitOptions, and its enums
FEATURE, IMAGE, BOUNDING_BOX = 1, 2, 3
RGB, GRAYSCALE = 1, 2
AXIS_LABELS, VALUE_LABELS = 2, 3  # AssociatedFileType: labels along an axis (a class per channel), per value
ACTIVATIONS = {"none": 0, "sigmoid": 1, "softmax": 2}  # MediaPipe's image segmenter options


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor's TFLite metadata. ``content``: 'feature', 'mask' (a grayscale image: class confidences
    along the last axis) or 'boxes' (``box_index``: where left, top, right, bottom sit, as ratios of the input);
    ``axes``: the ValueRange of the dimension that the content runs along; ``labels``: a label file's lines, one per
    channel ('mask') or per value ('feature')."""

    name: str
    description: str
    content: str = "feature"
    axes: tuple[int, int] | None = None
    box_index: tuple[int, int, int, int] | None = None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AppMetadata:
    """What an app task reads from a file: its name and description, the outputs in order, the groups of outputs
    read together (name, tensor names) and, for a segmenter, the activation that turns the outputs into confidences."""

    name: str
    description: str
    outputs: tuple[OutputTensor, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    activation: str | None = None
    label_file: str = "labels.txt"

    def min_parser_version(self) -> str:
        """The schema version that introduced the newest field used (per the schema's history)."""
        if self.activation is not None:
            return "1.5.0"  # CustomMetadata
        return "1.2.0" if self.groups else "1.0.0"  # tensor groups


def _flatbuffers():
    from .export import require

    return require("flatbuffers", "tflite")


class _Writer:
    """Tables of a flatbuffer, children first: each helper returns the offset of what it wrote."""

    def __init__(self):
        self.builder = _flatbuffers().Builder(1024)

    def strings(self, values) -> int:
        return self.offsets([self.builder.CreateString(value) for value in values])

    def offsets(self, offsets) -> int:
        builder = self.builder
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()

    def numbers(self, values, dtype) -> int:
        return self.builder.CreateNumpyVector(np.asarray(values, dtype=dtype))

    def table(self, fields: dict[int, tuple[str, object]]) -> int:
        """A table from ``{slot: (kind, value)}``, kind 'offset' (a string, vector or table written before), 'byte'
        or 'int'; None values are left out."""
        builder = self.builder
        builder.StartObject(max(fields, default=-1) + 1)
        for slot, (kind, value) in fields.items():
            if value is None:
                continue
            if kind == "offset":
                builder.PrependUOffsetTRelativeSlot(slot, value, 0)
            elif kind == "byte":
                builder.PrependInt8Slot(slot, value, -1)  # always written, even the schema's default
            else:
                builder.PrependInt32Slot(slot, value, -1)
        return builder.EndObject()

    def finish(self, root: int, identifier: bytes) -> bytes:
        self.builder.Finish(root, file_identifier=identifier)
        return bytes(self.builder.Output())


def _label_file(writer: _Writer, name: str, kind: int) -> int:
    text = writer.builder.CreateString
    file = writer.table({0: ("offset", text(name)), 1: ("offset", text("Labels for categories that the model can "
                                                                       "recognize.")), 2: ("byte", kind)})
    return writer.offsets([file])


def _input_tensor(writer: _Writer) -> int:
    """The image input: RGB uint8 pixels as they are (the normalisation is inside the graph)."""
    text = writer.builder.CreateString
    name, description = text("image"), text("RGB image, uint8 pixels; the model normalises them itself.")
    content = writer.table({0: ("byte", IMAGE), 1: ("offset", writer.table({0: ("byte", RGB)}))})
    stats = writer.table({0: ("offset", writer.numbers([255.0], np.float32)),
                          1: ("offset", writer.numbers([0.0], np.float32))})
    return writer.table({0: ("offset", name), 1: ("offset", description), 3: ("offset", content),
                         5: ("offset", stats)})


def _output_tensor(writer: _Writer, output: OutputTensor, label_file: str) -> int:
    text = writer.builder.CreateString
    name, description = text(output.name), text(output.description)
    if output.content == "boxes":
        properties = writer.table({0: ("offset", writer.numbers(output.box_index, np.uint32)),
                                   1: ("byte", 1), 2: ("byte", 0)})  # BOUNDARIES, RATIO
        kind = BOUNDING_BOX
    elif output.content == "mask":
        properties, kind = writer.table({0: ("byte", GRAYSCALE)}), IMAGE
    else:
        properties, kind = writer.table({}), FEATURE
    axes = None if output.axes is None else writer.table({0: ("int", output.axes[0]), 1: ("int", output.axes[1])})
    content = writer.table({0: ("byte", kind), 1: ("offset", properties), 2: ("offset", axes)})
    files = None
    if output.labels is not None:
        files = _label_file(writer, label_file, AXIS_LABELS if output.content == "mask" else VALUE_LABELS)
    return writer.table({0: ("offset", name), 1: ("offset", description), 3: ("offset", content),
                         5: ("offset", writer.table({})), 6: ("offset", files)})


def _segmenter_options(activation: str) -> bytes:
    """MediaPipe's ImageSegmenterOptions flatbuffer (file identifier ``V001``)."""
    writer = _Writer()
    return writer.finish(writer.table({0: ("byte", ACTIVATIONS[activation])}), b"V001")


def model_metadata(app: AppMetadata) -> bytes:
    """The TFLite Model Metadata flatbuffer of a graph with one image input and ``app.outputs``."""
    writer = _Writer()
    text = writer.builder.CreateString
    inputs = writer.offsets([_input_tensor(writer)])
    outputs = writer.offsets([_output_tensor(writer, output, app.label_file) for output in app.outputs])
    groups = None
    if app.groups:
        groups = writer.offsets([writer.table({0: ("offset", text(name)), 1: ("offset", writer.strings(names))})
                                 for name, names in app.groups])
    custom = None
    if app.activation is not None:
        options = _segmenter_options(app.activation)
        writer.builder.StartVector(1, len(options), 16)  # the schema's force_align: 16
        for byte in reversed(options):
            writer.builder.PrependUint8(byte)
        data = writer.builder.EndVector()
        custom = writer.offsets([writer.table({0: ("offset", text("SEGMENTER_METADATA")), 1: ("offset", data)})])
    subgraph = writer.table({2: ("offset", inputs), 3: ("offset", outputs), 8: ("offset", groups),
                             9: ("offset", custom)})
    return writer.finish(writer.table({0: ("offset", text(app.name)), 1: ("offset", text(app.description)),
                                       3: ("offset", writer.offsets([subgraph])),
                                       7: ("offset", text(app.min_parser_version()))}), b"M001")


def label_lines(app: AppMetadata) -> tuple[str, ...] | None:
    return next((output.labels for output in app.outputs if output.labels is not None), None)


# -- the model file --------------------------------------------------------------------------------------------------

def embed(path: Path, record: str, app: AppMetadata | None = None) -> None:
    """Write ``record`` (our JSON) into the ``.tflite`` file at ``path`` and, with ``app``, its TFLite Model
    Metadata and label file: the flatbuffer is rewritten with the new buffers, earlier ones of these names replaced."""
    from .export import require

    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    data = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    if any((buffer.offset or 0) > 1 for buffer in model.buffers or ()):
        raise ValueError(f"{path}: its weights lie outside the flatbuffer (a model over 2 GB); not supported")
    entries = {JSON_KEY: record.encode()}
    if app is not None:
        entries[TFLITE_METADATA] = model_metadata(app)
    model.metadata = [entry for entry in model.metadata or () if entry.name.decode() not in entries]
    for name, payload in entries.items():
        buffer, entry = schema.BufferT(), schema.MetadataT()
        buffer.data = np.frombuffer(payload, dtype=np.uint8)
        entry.name, entry.buffer = name, len(model.buffers)
        model.buffers.append(buffer)
        model.metadata.append(entry)
    builder = _flatbuffers().Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    output = io.BytesIO(bytes(builder.Output()))
    labels = None if app is None else label_lines(app)
    if labels is not None:
        with zipfile.ZipFile(output, "a") as archive:  # appended after the flatbuffer
            archive.writestr(app.label_file, "".join(f"{label}\n" for label in labels))
    path.write_bytes(output.getvalue())


def read_entry(path: Path, name: str = JSON_KEY) -> bytes | None:
    """The buffer that the ``.tflite`` file's metadata list names ``name``; None where there is none. A file that is
    no TFLite flatbuffer is a ValueError."""
    from .export import require

    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == name:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None
