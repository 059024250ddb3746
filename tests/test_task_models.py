"""The task-model interface (heads.task_model): every registered task model takes uint8 or [0, 1] images in
forward_batch, post-processes from its metadata alone, and takes a backbone module as it is."""
import pytest
import timm
import torch
from conftest import randomize_batchnorm

import heads
from heads.registry import MODELS, TASK_MODELS
from heads.task_model import TaskModel
from mbbackbones.choices import ArgumentError

CLASSES = {cls.task: cls for cls in TASK_MODELS.values()}
SMALL = {"detection": "ssdlite320_mbv3_small_reduced", "segmentation": "lraspp_mbv3_small_reduced"}


def test_every_registered_model_implements_the_interface():
    for entry in MODELS:
        assert issubclass(entry.model_cls, TaskModel) and TASK_MODELS[entry.model_cls.task] is entry.model_cls
    for cls in TASK_MODELS.values():
        assert cls.result_type is not None and cls.output_names and cls.class_layers


@pytest.mark.parametrize("task", sorted(CLASSES))
def test_forward_batch_takes_uint8_and_unit_range_images_alike(task):
    model = randomize_batchnorm(heads.create_model(SMALL[task]))
    size = model.export_size(None if not model.dynamic_size() else (64, 96))
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        for ours, theirs in zip(model.forward_batch(images), model.forward_batch(images.float() / 255), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", sorted(CLASSES))
def test_results_need_only_the_metadata(task):
    """What the Predictor does for an exported file: the class's hooks on outputs and metadata, no model."""
    model = randomize_batchnorm(heads.create_model(SMALL[task]))
    cls, meta = type(model), model.meta
    size = cls.input_size(meta, 120, 200)
    with torch.no_grad():
        outputs = model.forward_batch(torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8))
    fields = cls.results([output[0] for output in outputs], meta, size, (120, 200))
    result = cls.result_type(image=None, path=None, categories=meta["categories"], timings=None, **fields)
    prediction = result.prediction()
    if isinstance(prediction, dict):  # boxes in the original 200 x 120 pixels
        assert prediction["boxes"].shape[1] == 4 and (prediction["boxes"][:, 2] <= 200 + 1e-3).all()
    else:
        assert tuple(prediction.shape) == (120, 200)


def timm_features(**kwargs) -> torch.nn.Module:
    return timm.create_model("mobilenetv3_small_100", features_only=True, pretrained=False, **kwargs)


@pytest.mark.parametrize("name, out_indices", [("ssdlite320_mbv3_small", (3, 4)), ("lraspp_mbv3_small", (2, 4))])
def test_a_backbone_module_is_used_as_it_is(name, out_indices):
    backbone = timm_features(out_indices=out_indices)
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    model = heads.create_model(name, backbone=backbone)
    assert model.backbone is backbone  # not rebuilt, not re-initialised
    assert all(torch.equal(value, before[key]) for key, value in backbone.state_dict().items())
    model.eval()
    size = model.export_size(None if not model.dynamic_size() else (64, 96))
    with torch.no_grad():
        outputs = model.forward_batch(torch.rand(1, 3, *size))
    assert [tuple(o.shape)[0] for o in outputs] == [1] * len(model.output_names)


def test_backbone_module_mistakes_are_one_line():
    with pytest.raises(ArgumentError, match="has no feature_info: pass a registered name or a module"):
        heads.create_model("ssdlite320_mbv3_small", backbone=torch.nn.Conv2d(3, 8, 1))
    with pytest.raises(ArgumentError, match="pretrained_backbone loads a named backbone's weights"):
        heads.create_model("ssdlite320_mbv3_small", backbone=timm_features(out_indices=(3, 4)),
                           pretrained_backbone=True)
    with pytest.raises(ArgumentError, match="options of a named backbone"):
        heads.create_model("lraspp_mbv3_small", backbone=timm_features(out_indices=(2, 4)), drop_path_rate=0.1)
    with pytest.raises(ArgumentError, match="LR-ASPP reads two feature maps"):
        heads.create_model("lraspp_mbv3_small", backbone=timm_features())
