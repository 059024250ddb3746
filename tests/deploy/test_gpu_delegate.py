"""LiteRT's GPU delegate takes every operator of our fp32 raw ``.tflite`` files: the flatbuffer's operators against
the delegate's own list, and the rewritten files still equal PyTorch."""
import pytest
import torch
from conftest import randomize_batchnorm

import heads
import mbbackbones
from heads.deploy import export, runtimes

pytest.importorskip("litert_torch")
pytestmark = pytest.mark.usefixtures("one_thread")

# The operators that LiteRT's GPU delegate accepts, from CheckGpuDelegateCompatibility in
# tensorflow/lite/tools/versioning/gpu_compatibility.cc (tensorflow/tensorflow at commit
# 03a5e4e19a9c8200e13c85f1c637877fdf589be6; the delegate's model_builder.cc defers to it). Left out: the operators it
# accepts only under conditions this test does not read (GATHER, CAST, SELECT, ONE_HOT, STRIDED_SLICE's masks,
# quantization and custom ops), so that one turning up fails here and gets a look. The delegate's tensors are BHWC: at
# most 4 dimensions.
GPU_DELEGATE_OPS = {
    "ABS", "ADD", "ADD_N", "ATAN2", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CEIL", "CONCATENATION", "CONV_2D", "COS",
    "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DIV", "ELU", "EQUAL", "EXP", "FLOOR", "FLOOR_DIV", "FLOOR_MOD",
    "FULLY_CONNECTED", "GELU", "GREATER", "GREATER_EQUAL", "HARD_SWISH", "LEAKY_RELU", "LESS", "LESS_EQUAL", "LOG",
    "LOGICAL_AND", "LOGISTIC", "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL",
    "PACK", "PAD", "PADV2", "POW", "PRELU", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD", "RELU", "RELU6",
    "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SIGN", "SIN", "SLICE",
    "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "SUB", "SUM", "TANH",
    "TILE", "TRANSPOSE", "TRANSPOSE_CONV",
}
INPUT_DIMS = {"SLICE": (3, 4), "DEPTHWISE_CONV_2D": (4,), "PAD": (3, 4), "PADV2": (3, 4), "MIRROR_PAD": (3, 4)}
MAX_DIMS = 4

# one export per distinct source of operators: SSDLite's head, box decoding and default boxes (at its 320),
# LR-ASPP's head, MobileNetV3 small and large (squeeze-excitation, hard-swish), MobileNetV4 conv blocks and a
# classifier's head; and one MobileNetV4 hybrid block (multi-query attention) alone, a whole hybrid converting slowly
MODELS = {"ssdlite320_mbv3_small": None, "lraspp_mbv3_large": (64, 128), "mbv4_conv_small": (64, 64)}
ATTENTION = "mbv4_hybrid_medium", "blocks.7"  # a Mobile MQA block (stride 16)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = heads.create_model(name) if name in heads.list_models() else mbbackbones.create_model(name)
    return randomize_batchnorm(model).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """name -> (model, size, its fp32 raw .tflite)."""
    folder, files = tmp_path_factory.mktemp("gpu"), {}
    for name, size in MODELS.items():
        model = build(name)
        size = export.export_size(model, size)
        files[name] = model, size, runtimes.export(model, folder / f"{name}.tflite", postprocess=False, size=size)
    return files


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """The Mobile MQA block, rewritten as ``write_tflite`` rewrites it, converted by litert-torch: (the block, an
    input, the converted model, its .tflite)."""
    import litert_torch

    name, block_name = ATTENTION
    block = export.for_gpu_delegate(build(name).get_submodule(block_name), (4, 4))
    images = torch.rand(1, block.norm.num_features, 4, 4, generator=torch.Generator().manual_seed(0))
    converted = litert_torch.convert(block, (images,))
    path = tmp_path_factory.mktemp("attention") / "block.tflite"
    converted.export(str(path))
    return block, images, converted, path


def unsupported(operator: export.TfliteOperator) -> str | None:
    """Why the GPU delegate rejects ``operator``, or None."""
    if operator.name not in GPU_DELEGATE_OPS:
        return "not a GPU delegate operator"
    if any(len(shape) > MAX_DIMS for shape in operator.inputs + operator.outputs):
        return f"a tensor above {MAX_DIMS}-D"
    if operator.name in INPUT_DIMS and len(operator.inputs[0]) not in INPUT_DIMS[operator.name]:
        return f"{len(operator.inputs[0])}-D input (takes {INPUT_DIMS[operator.name]})"
    if operator.name == "ADD_N" and len(operator.inputs) != 2:
        return "not 2 inputs"
    if operator.name == "MUL" and len(set(map(len, operator.inputs))) == 1:  # neither input smaller in every dim
        first, second = operator.inputs
        if any(a < b for a, b in zip(first, second)) and any(b < a for a, b in zip(first, second)):
            return "each input smaller than the other in some dimension"
    return None


@pytest.mark.parametrize("name", [*MODELS, "/".join(ATTENTION)])
def test_every_operator_runs_on_the_gpu_delegate(name, exported, attention):
    operators = export.tflite_operators(exported[name][2] if name in exported else attention[3])
    assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= {operator.name for operator in operators}  # the file was read
    rejected = [f"{operator.name} {operator.inputs} -> {operator.outputs} ({reason}) from {operator.tensor}"
                for operator in operators if (reason := unsupported(operator))]
    assert not rejected, "\n".join(rejected)


@pytest.mark.parametrize("name", MODELS)
def test_the_rewritten_file_equals_pytorch(name, exported):
    model, size, path = exported[name]
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    checks = runtimes.check(model, runtimes.load(path), images)
    assert checks and all(check.passed for check in checks), "\n".join(map(str, checks))


def test_the_rewritten_attention_equals_pytorch_in_litert(attention):
    block, images, converted, _ = attention
    with torch.no_grad():
        expected = block(images)
    torch.testing.assert_close(torch.from_numpy(converted(images)), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, size, rewritten, tolerance", [
    ("ssdlite320_mbv3_small", (320, 320), export._ScoringHead, 0.0),  # a reordering: exact
    ("mbv4_hybrid_medium", (64, 64), export._SharedKeyAttention, 1e-6)])  # matrix products in another order
def test_the_rewrite_keeps_the_pytorch_numbers(name, size, rewritten, tolerance):
    model = build(name)
    graph = export.DeployGraph(export.for_gpu_delegate(export.fold_batchnorm(model), size))
    assert any(isinstance(module, rewritten) for module in graph.modules())
    images = torch.rand(1, 3, *size)
    with torch.no_grad():
        expected, got = export.DeployGraph(export.fold_batchnorm(model))(images), graph(images)
    for ours, theirs in zip(*(outputs if isinstance(outputs, tuple) else (outputs,) for outputs in (got, expected))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
