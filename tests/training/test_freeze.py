"""Fine-tuning controls: ``trainable_backbone_layers`` counts stages as torchvision's SSDLite does, frozen BatchNorm
keeps its statistics, and training leaves frozen weights exactly as they were."""
from contextlib import nullcontext
from functools import partial

import pytest
import torch
from test_engine import Interrupt, tiny
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.detection.ssdlite import _mobilenet_extractor

import heads
from heads.backbone import backbone_stages, freeze_stages
from heads.task_model import is_frozen
from heads.training.config import ConfigError, make_config
from heads.training.engine import Trainer
from heads.training.launch import configure
from heads.training.tasks import get_task
from mbbackbones.choices import ArgumentError

TORCHVISION_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDLite


def norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name, torchvision_backbone", [
    ("ssdlite320_mbv3_large_reduced", partial(mobilenet_v3_large, reduced_tail=True)),
    ("ssdlite320_mbv3_large", mobilenet_v3_large),
    ("ssdlite320_mbv3_small", mobilenet_v3_small)])
def test_frozen_parameters_are_torchvisions_for_every_trainable_backbone_layers(name, torchvision_backbone):
    """torchvision's own freezing (its SSDLite builder applies it only with weights, so its extractor is called)
    marks each parameter; our converter of torchvision's SSDLite checkpoints carries the marks to our names."""
    with pytest.warns(UserWarning, match="freezes 6 backbone stages that hold random weights"):
        model = heads.create_model(name, trainable_backbone_layers=0)
    for trainable in range(7):
        reference = _mobilenet_extractor(torchvision_backbone(norm_layer=TORCHVISION_NORM), trainable,
                                         TORCHVISION_NORM)
        frozen = {key for key, p in reference.named_parameters() if not p.requires_grad}
        marks = {f"backbone.{key}": torch.full_like(value, float(key in frozen))
                 for key, value in reference.state_dict().items()}
        freeze_stages(model.requires_grad_(True).backbone, trainable, name)
        expected = model.convert_checkpoint(marks)
        actual = {f"backbone.{key}": not p.requires_grad for key, p in model.backbone.named_parameters()}
        assert actual == {key: bool(expected[key].flatten()[0]) for key in actual}, trainable
        assert all(p.requires_grad for key, p in model.named_parameters() if not key.startswith("backbone."))
    with pytest.raises(ValueError, match="trainable_layers should be in the range"):
        _mobilenet_extractor(torchvision_backbone(norm_layer=TORCHVISION_NORM), 7, TORCHVISION_NORM)


def test_out_of_range_names_the_range_of_that_backbone():
    for name, backbone, stages in [("ssdlite320_mbv3_large", None, 6), ("ssdlite320_mbv1_100", None, 6),
                                   ("lraspp_mbv3_large", "timm/efficientnet_lite0", 5)]:
        for value in (-1, stages + 1):
            taps = pytest.warns(UserWarning, match="no 'downsample' feature taps") if backbone else nullcontext()
            with pytest.raises(ArgumentError) as error, taps:
                heads.create_model(name, backbone=backbone, trainable_backbone_layers=value)
            message = str(error.value)
            assert f"trainable_backbone_layers={value}:" in message and f"takes 0..{stages} " in message
            assert "\n" not in message


def test_a_timm_backbone_has_the_stages_of_the_same_mobilenet_of_ours():
    """Stages read from timm's feature_info hold the parameters of the stages our MobileNetV3 declares."""
    ours = heads.create_model("ssdlite320_mbv3_large")
    timm_v3 = heads.create_model("ssdlite320_mbv3_large", backbone="timm/mobilenetv3_large_100")

    def sizes(model):
        return [sum(p.numel() for layer in stage.layers for p in model.backbone.get_submodule(layer).parameters())
                for stage in backbone_stages(model.backbone)]

    assert sizes(ours) == sizes(timm_v3) and len(sizes(ours)) == 6
    assert [stage.reduction for stage in backbone_stages(timm_v3.backbone)] == [2, 4, 8, 16, 32, 32]


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    with pytest.warns(UserWarning, match="freezes 3 backbone stages that hold random weights"):
        model = heads.create_model("ssdlite320_mbv3_small_reduced", trainable_backbone_layers=3, size=160).train()
    frozen = {name: m for name, m in norms(model).items() if is_frozen(m)}
    assert frozen and all(name.startswith("backbone.model.") for name in frozen)
    assert not any(m.training for m in frozen.values())
    assert all(m.training for name, m in norms(model).items() if name not in frozen)
    before = {name: m.running_mean.clone() for name, m in norms(model).items()}
    target = {"boxes": torch.tensor([[10.0, 10, 90, 90]]), "labels": torch.tensor([1])}
    model([torch.rand(3, 160, 160)] * 2, [target] * 2)
    assert all(torch.equal(norms(model)[name].running_mean, before[name]) == (name in frozen) for name in before)
    assert {name for name, m in norms(model.eval().train()).items() if m.training} == set(before) - set(frozen)


def test_config_keys_freeze_and_trainable_backbone_layers():
    task = get_task("detection")
    with pytest.raises(ConfigError, match="freeze: backbone and trainable_backbone_layers: 2 together"):
        task.check(make_config(dict(freeze="backbone", trainable_backbone_layers=2)))
    with pytest.raises(ConfigError, match="freeze must be one of backbone, got 'head'"):
        make_config(dict(freeze="head"))
    with pytest.raises(ConfigError, match="trainable_backbone_layers must be >= 0, got -1"):
        make_config(dict(trainable_backbone_layers=-1))
    with pytest.raises(ConfigError, match="model_kwargs: trainable_backbone_layers is the config key"):
        task.check(make_config(dict(model_kwargs=dict(trainable_backbone_layers=2))))


@pytest.fixture(scope="module")
def data(tmp_path_factory, data_home) -> tuple:
    """The built-in set, and weights to fine-tune from: a detector of its 5 classes, saved as a state dict."""
    from heads.detection.builtin import builtin_coco

    path = tmp_path_factory.mktemp("weights") / "detector.pth"
    torch.save(heads.create_model("ssdlite320_mbv3_small_reduced", num_classes=6).state_dict(), path)
    return builtin_coco(), str(path)


def frozen_state(trainer: Trainer, stages: int) -> dict:
    """A copy of the frozen parameters and their BatchNorm statistics before training, after checking that the
    frozen parameters are the backbone's but its last ``stages`` stages'."""
    model = trainer.model
    backbone = model.backbone
    top = backbone_stages(backbone)[::-1][:stages]
    trained = {f"backbone.{layer}.{key}" for stage in top
               for layer in stage.layers for key, _ in backbone.get_submodule(layer).named_parameters()}
    frozen = {key for key, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {key for key, _ in model.named_parameters() if key.startswith("backbone.")} - trained
    statistics = {f"{name}.{buffer}" for name, m in norms(model).items() if is_frozen(m)
                  for buffer in ("running_mean", "running_var", "num_batches_tracked")}
    return {key: value.clone() for key, value in model.state_dict().items() if key in frozen | statistics}


def check_frozen(trainer: Trainer, initial: dict, before: dict) -> None:
    """Frozen weights and statistics bit-identical after training, trainable weights changed, and the optimizer
    holding only the trainable parameters."""
    model, final = trainer.model, trainer.model.state_dict()
    assert all(torch.equal(final[key], value) for key, value in initial.items())
    trainable = {key: p for key, p in model.named_parameters() if p.requires_grad}
    convolutions = [key for key in trainable if key.endswith("conv.weight")]
    assert convolutions and all(not torch.equal(final[key], before[key]) for key in convolutions)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == set(map(id, trainable.values()))
    assert len(trainer.optimizer.state_dict()["state"]) == len(trainable)


def stay_in_eval_mode(trainer: Trainer) -> None:
    """A callback: frozen BatchNorm is in eval mode at every step."""
    assert not any(m.training for m in norms(trainer.model).values() if is_frozen(m))


def test_a_frozen_backbone_stays_bit_identical_through_training_and_recalibration(data, tmp_path):
    data_root, pretrained = data
    config = tiny(tmp_path, data_root, pretrained=pretrained, freeze="backbone", bn_recalibrate=1, max_steps=2,
                  tensorboard=False)
    trainer = Trainer(make_config(config), get_task("detection"), callback=stay_in_eval_mode)
    initial, before = frozen_state(trainer, 0), {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    check_frozen(trainer, initial, before)


def test_a_fine_tuning_run_keeps_frozen_layers_and_resumes_exactly(data, tmp_path):
    data_root, pretrained = data
    task = get_task("detection")
    config = dict(pretrained=pretrained, trainable_backbone_layers=2, max_steps=3, tensorboard=False)
    whole = Trainer(make_config(tiny(tmp_path / "whole", data_root, **config)), task, callback=stay_in_eval_mode)
    initial, before = frozen_state(whole, 2), {k: v.clone() for k, v in whole.model.state_dict().items()}
    whole.fit()
    check_frozen(whole, initial, before)

    def kill_after_step_3(trainer):
        if trainer.step == 3:  # the last checkpoint is step 2
            raise Interrupt

    cfg = make_config(tiny(tmp_path / "killed", data_root, **config))
    with pytest.raises(Interrupt):
        Trainer(cfg, task, callback=kill_after_step_3).fit()
    resumed = Trainer(cfg, task, resume=str(tmp_path / "killed"))
    assert resumed.step == 2
    resumed.fit()
    expected, actual = whole.state(), resumed.state()
    assert all(torch.equal(actual["model"][key], value) for key, value in expected["model"].items())
    with pytest.raises(ConfigError, match="trainable_backbone_layers 2 -> 3"):
        configure(None, {"trainable_backbone_layers": 3}, resume=str(tmp_path / "killed"))
