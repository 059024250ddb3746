"""Loading torchvision, timm and our own checkpoints from local files, offline, with parity."""
import pytest
import timm
import torch
import torchvision
from conftest import randomize_batchnorm
from safetensors.torch import save_file

import mbbackbones
from mbbackbones import CheckpointError, convert, detect_format

IMAGE = torch.randn(2, 3, 160, 160)


def save(model, path):
    torch.save(model.state_dict(), path)
    return str(path)


def load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


@pytest.mark.parametrize(("name", "reference"), [
    ("mbv3_large", lambda: torchvision.models.mobilenet_v3_large()),
    ("mbv3_small", lambda: torchvision.models.mobilenet_v3_small()),
    ("mbv3_large_reduced", lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True)),
    ("mbv3_small_reduced", lambda: torchvision.models.mobilenet_v3_small(reduced_tail=True)),
    ("mbv2_100", lambda: torchvision.models.mobilenet_v2()),
])
def test_torchvision_checkpoint_reproduces_torchvision(tmp_path, name, reference):
    reference = randomize_batchnorm(reference())
    model = load(name, save(reference, tmp_path / "tv.pth"))
    with torch.no_grad():
        assert (model(IMAGE) - reference(IMAGE)).abs().max() <= 1e-5


def test_dilated_features_reproduce_torchvision(tmp_path):
    reference = randomize_batchnorm(torchvision.models.mobilenet_v3_large(dilated=True))
    model = load("mbv3_large", save(reference, tmp_path / "tv.pth"), features_only=True, output_stride=16)
    with torch.no_grad():
        ours = model(IMAGE)[-1]
        assert ours.shape[-1] == 160 // 16
        assert (ours - reference.features(IMAGE)).abs().max() <= 1e-5


@pytest.mark.parametrize(("name", "timm_name", "kwargs"), [
    ("mbv3_large", "mobilenetv3_large_100", dict(norm_eps=1e-5)),
    ("mbv3_small", "mobilenetv3_small_100", dict(norm_eps=1e-5)),
    ("mbv3_large_075", "mobilenetv3_large_075", dict(norm_eps=1e-5)),
    ("mbv2_100", "mobilenetv2_100", {}),
    ("mbv2_050", "mobilenetv2_050", {}),
    ("mbv1_100", "mobilenetv1_100", {}),
    *[(f"mbv4_{variant}", f"mobilenetv4_{variant}", {})
      for variant in ("conv_small", "conv_medium", "conv_large", "hybrid_medium", "hybrid_large")],
])
def test_timm_checkpoint_loads_strictly_and_reproduces_timm(tmp_path, name, timm_name, kwargs):
    """Within 1e-4 of the logits' scale (random V4 convs with random BN statistics reach 1e7)."""
    reference = randomize_batchnorm(timm.create_model(timm_name))
    state_dict = reference.state_dict()
    model = timm.create_model(name, **kwargs).eval()
    converted = convert(state_dict, model)
    assert set(converted) == set(model.state_dict())  # strict: every key, nothing extra
    save_file(state_dict, tmp_path / "timm.safetensors")
    model = load(name, tmp_path / "timm.safetensors", **kwargs)
    with torch.no_grad():
        expected = reference(IMAGE)
        assert (model(IMAGE) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())


def test_own_checkpoint_round_trip_and_features_drop_classifier(tmp_path):
    model = randomize_batchnorm(timm.create_model("mbv3_small_reduced"))
    path = save(model, tmp_path / "ours.pth")
    assert detect_format(model.state_dict()) == "mbbackbones"
    again = load("mbv3_small_reduced", path)
    features = load("mbv3_small_reduced", path, features_only=True)
    assert not any(k.startswith("classifier") for k in features.state_dict())
    with torch.no_grad():
        assert torch.equal(again(IMAGE), model(IMAGE))
        assert torch.equal(features(IMAGE)[-1], model.forward_features(IMAGE))


def test_training_checkpoint_dict_and_new_num_classes(tmp_path):
    """A {'model': state_dict} file loads; a new classifier size keeps the body and reinitialises the head."""
    reference = randomize_batchnorm(torchvision.models.mobilenet_v3_small())
    torch.save({"model": reference.state_dict(), "epoch": 3}, tmp_path / "train.pth")
    model = load("mbv3_small", tmp_path / "train.pth", num_classes=5)
    assert model.classifier.out_features == 5
    assert torch.equal(model.head_fc.weight, reference.classifier[0].weight)


def test_detect_format():
    assert detect_format(torchvision.models.mobilenet_v2().state_dict()) == "torchvision"
    assert detect_format(timm.create_model("mobilenetv2_100").state_dict()) == "timm"
    with pytest.raises(CheckpointError, match="unrecognised state dict \\(first key 'conv1.weight'\\)"):
        detect_format(torchvision.models.resnet18().state_dict())


def test_wrong_architecture_names_the_problem(tmp_path):
    path = save(torchvision.models.mobilenet_v2(), tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match="mbv3_large: checkpoint .*v2.pth does not fit: torchvision checkpoint "
                                              "has a tensor the model lacks: 'blocks.15.expand.conv.weight' "
                                              r"\(checkpoint key 'features.16.conv.0.0.weight'\)"):
        load("mbv3_large", path)


def test_shape_mismatch_names_first_key(tmp_path):
    path = save(timm.create_model("mbv3_large"), tmp_path / "ours.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'blocks.3.project.conv.weight': checkpoint "
                                              r"\(40, 72, 1, 1\), model \(32, 72, 1, 1\)") as error:
        load("mbv3_large_075", path)
    assert "\n" not in str(error.value)
    tv_path = save(torchvision.models.mobilenet_v3_large(), tmp_path / "tv.pth")
    expected = r"'blocks.12.project.conv.weight' \(checkpoint key 'features.13.block.3.0.weight'\)"
    with pytest.raises(CheckpointError, match=expected):
        load("mbv3_large_reduced", tv_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mbv3_large: pretrained file not found: .*nope.pth"):
        load("mbv3_large", tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth is truncated or not a PyTorch checkpoint"):
        load("mbv3_large", tmp_path / "junk.pth")


def test_pretrained_without_weights_or_network_says_how_to_pass_a_file():
    with pytest.raises(RuntimeError, match="mbv3_large_reduced has no published weights; .*pretrained_cfg_overlay"):
        timm.create_model("mbv3_large_reduced", pretrained=True)
    unreachable = dict(url="http://127.0.0.1:9/mobilenet_v3_large.pth", hf_hub_id=None)
    with pytest.raises(RuntimeError, match="weights mobilenet_v3_large.pth are not in .*checkpoints and could not be "
                                           "downloaded .*pretrained_cfg_overlay=dict"):
        timm.create_model("mbv3_large", pretrained=True, pretrained_cfg_overlay=unreachable)
    with pytest.raises(RuntimeError, match="timm/mobilenetv1_100.* are not in .* could not be downloaded"):
        timm.create_model("mbv1_100", pretrained=True)  # Hugging Face hub, offline in tests


def test_convert_is_pure():
    state_dict = torchvision.models.mobilenet_v3_small().state_dict()
    before = dict(state_dict)
    convert(state_dict, mbbackbones.create_model("mbv3_small"))
    assert list(state_dict) == list(before)
