"""Contracts every registered model keeps: the graph tools of torch, torchvision and timm take it whole.

torch.fx (torchvision's feature extraction, timm's ``feature_cls="fx"`` and timm's own FX tests), TorchScript,
torch.export and ``forward_intermediates``, each on every name of ``mbbackbones.list_models()``.
"""
import pytest
import timm
import torch
from timm.models import create_feature_extractor as timm_feature_extractor
from timm.models import get_graph_node_names as timm_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import mbbackbones
from mbbackbones.model import FEATURE_LOCATIONS

NAMES = mbbackbones.list_models()
IMAGE = torch.randn(2, 3, 64, 64)


def classifier(name, **kwargs):
    return timm.create_model(name, num_classes=5, **kwargs).eval()


CONVERSIONS = {
    "fx": torch.fx.symbolic_trace,
    "torchscript": torch.jit.script,
    "export": lambda module: torch.export.export(module, (IMAGE,)).module(),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("global_pool", ["avg", ""])
@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_classifier_converts_whole(name, global_pool, conversion):
    """torch.fx, TorchScript and torch.export take the classifier as one graph, pooled and unpooled (its head then
    acts at every position), with the eager outputs."""
    eager = classifier(name, global_pool=global_pool)
    converted = CONVERSIONS[conversion](eager)
    with torch.no_grad():
        expected = eager(IMAGE)
        assert expected.dim() == (2 if global_pool else 4)
        torch.testing.assert_close(converted(IMAGE), expected, rtol=0, atol=1e-6)


def last_node_of_each_part(model: torch.nn.Module, nodes: list[str]) -> dict[str, str]:
    """The graph node that ends the stem, each block and the last conv."""
    parts = ["stem", *(f"blocks.{i}" for i in range(len(model.blocks))), "last_conv"]
    return {part: [n for n in nodes if n == part or n.startswith(part + ".")][-1] for part in parts}


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_feature_extractor_matches_module_outputs(name):
    """Nodes named by torchvision's ``get_graph_node_names`` give what the modules output in the eager forward."""
    eager = classifier(name)
    _, nodes = get_graph_node_names(eager)
    part_nodes = last_node_of_each_part(eager, nodes)
    extractor = create_feature_extractor(eager, return_nodes=[*part_nodes.values(), nodes[-1]])
    outputs = {}
    for part in part_nodes:
        eager.get_submodule(part).register_forward_hook(
            lambda module, args, output, part=part: outputs.__setitem__(part, output.clone()))
    with torch.no_grad():
        logits = eager(IMAGE)
        extracted = extractor(IMAGE)
    assert torch.equal(extracted[nodes[-1]], logits)
    for part, node in part_nodes.items():
        assert torch.equal(extracted[node], outputs[part]), part


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("location", FEATURE_LOCATIONS)
def test_timm_fx_features_match_default_features(name, location):
    """``feature_cls="fx"`` (the taps as nodes of the traced graph) gives the default wrapper's maps (which
    ``forward_intermediates`` computes)."""
    built = []
    for kwargs in ({}, dict(feature_cls="fx")):
        torch.manual_seed(0)  # the same weights in both (their state dict keys differ)
        built.append(timm.create_model(name, features_only=True, feature_location=location, **kwargs).eval())
    default, fx = built
    assert fx.feature_info.channels() == default.feature_info.channels()
    with torch.no_grad():
        for ours, theirs in zip(fx(IMAGE), default(IMAGE), strict=True):
            assert torch.equal(ours, theirs)


def timm_fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's FX graph of a model (its leaf modules and functions), returning the model's output, as in timm's
    tests/test_models.py."""
    train_nodes, eval_nodes = timm_graph_node_names(model)
    return timm_feature_extractor(model, [(train_nodes if model.training else eval_nodes)[-1]])


@pytest.mark.parametrize("name", NAMES)
def test_timm_fx_forward(name):
    """timm's test_model_forward_fx."""
    eager = classifier(name)
    with torch.no_grad():
        expected = eager(IMAGE)
        outputs = tuple(timm_fx_model(eager)(IMAGE).values())
    assert len(outputs) == 1 and torch.equal(outputs[0], expected)


@pytest.mark.parametrize("name", NAMES)
def test_timm_fx_backward(name):
    """timm's test_model_backward_fx: every parameter gets a gradient through the graph."""
    graph = timm_fx_model(timm.create_model(name, num_classes=42).train())
    (outputs,) = graph(IMAGE).values()
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and not outputs.isnan().any()
    missing = [n for n, p in graph.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_follow_feature_info(name):
    """C1..C5 have the channels and strides ``feature_info`` declares; the final map is forward_features'."""
    eager = classifier(name)
    with torch.no_grad():
        final, intermediates = eager.forward_intermediates(IMAGE)
        assert torch.equal(final, eager.forward_features(IMAGE))
    assert [tuple(f.shape[1:]) for f in intermediates] == [
        (info["num_chs"], 64 // info["reduction"], 64 // info["reduction"]) for info in eager.feature_info]
