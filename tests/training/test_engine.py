"""The shared training engine: configs, step layout, exact resume and torchrun/DDP equivalence."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heads.training.config import ConfigError, load_config, make_config, parse_overrides
from heads.training.engine import StepSampler, Trainer, lr_factor
from heads.training.tasks import get_task

ROOT = Path(__file__).parents[2]


def tiny(tmp_path, data_root, **overrides) -> dict:
    """A detection run small enough for a test: SSDLite on V3-Small at 160 px, a few steps."""
    return {**dict(model="ssdlite320_mbv3_small_reduced", model_kwargs={"size": 160},
                   batch_size=2, workers=0, optimizer="adam", lr=1e-3, lr_batch=2, warmup_steps=2, epochs=1,
                   max_steps=6, checkpoint_every=2, eval_limit=2, log_every=1, output=str(tmp_path)), **overrides}


@pytest.fixture(scope="module")
def data_root(data_home):
    """The built-in COCO-format set, in the module's data home."""
    from heads.detection.builtin import builtin_coco

    return builtin_coco()


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'.*Valid keys: task, model"):
        make_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        parse_overrides(["--epoch", "3"])
    with pytest.raises(ConfigError, match="batch_size must be an integer, got 'two'"):
        make_config({"batch_size": "two"})
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_layers_defaults_file_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.05\nepochs: 3\nmodel_kwargs: {size: 256}\n")
    cfg = load_config(tmp_path / "run.yaml", ["--epochs", "7", "--amp", "--crop-size", "[64, 128]"], batch_size=4)
    assert (cfg.lr, cfg.epochs, cfg.amp, cfg.batch_size, cfg.crop_size) == (0.05, 7, True, 4, [64, 128])
    assert cfg.model_kwargs == {"size": 256} and cfg.weight_decay == 4e-5  # torchvision's SSDLite recipe


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model in __import__("heads").list_models(), path


def test_two_processes_see_the_micro_batches_of_one_accumulating_process():
    single = list(StepSampler(40, batch_size=3, accumulate=2, seed=5))
    ranks = [list(StepSampler(40, batch_size=3, world=2, rank=r, seed=5)) for r in (0, 1)]
    assert len(single) == 2 * len(ranks[0]) == 12
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]
    resumed = StepSampler(40, batch_size=3, accumulate=2, seed=5)
    resumed.set_epoch(0, start_step=4)
    assert list(resumed) == single[8:]
    indices = [i for batch in single for i, _ in batch]
    assert len(set(indices)) == len(indices)  # no sample twice in an epoch


def test_lr_warms_up_then_decays():
    factors = [lr_factor(s, 100, 10, 0.001, "cosine") for s in range(101)]
    assert factors[0] == 0.001 and factors[10] == 1.0 and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(55, 100, 10, 0.001, "poly") == pytest.approx(0.5 ** 0.9)


class Interrupt(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, data_root):
    task = get_task("detection")
    whole = Trainer(make_config(tiny(tmp_path / "whole", data_root, ema=True)), task)
    whole.fit()

    def kill_after_step_5(trainer):
        if trainer.step == 5:  # the last checkpoint is step 4: step 5's work is lost, as in a crash
            raise Interrupt

    cfg = make_config(tiny(tmp_path / "killed", data_root, ema=True))
    with pytest.raises(Interrupt):
        Trainer(cfg, task, callback=kill_after_step_5).fit()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 4
    resumed = Trainer(cfg, task, resume=str(tmp_path / "killed"))
    assert resumed.step == 4
    resumed.fit()
    expected, actual = whole.state(), resumed.state()
    for part in ("model", "model_ema"):
        for key, value in expected[part].items():
            assert torch.equal(actual[part][key], value), (part, key)
    assert actual["optimizer"]["state"][0]["exp_avg"].equal(expected["optimizer"]["state"][0]["exp_avg"])
    assert (tmp_path / "killed" / "plot.png").stat().st_size > 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # step 5's first attempt is forgotten


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, data_root):
    config = tiny(tmp_path, data_root, max_steps=3, eval_limit=1)
    args = [token for k, v in config.items() if k != "output"
            for token in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    tool = str(ROOT / "tools" / "train_det.py")
    subprocess.run([sys.executable, tool, *args, "--accumulate", "2", "--output", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    tool, *args, "--output", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for key, value in one.items():
        if value.is_floating_point() and "running" not in key:  # DDP broadcasts rank 0's BN statistics
            torch.testing.assert_close(two[key], value, rtol=1e-3, atol=1e-5)


def test_tool_errors_are_one_line(tmp_path, capsys):
    from heads.cli import train_main as main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit):
        main(["--dataset", "coco", "--output", str(tmp_path)])
    assert "needs data_root" in capsys.readouterr().err


def test_amp_ema_and_gradient_clipping_train(tmp_path, data_root):
    """bfloat16 autocast on CPU (float16 + GradScaler on CUDA) with EMA and clipping: finite losses, a checkpoint.

    Not channels-last: torch 2.14's CPU bfloat16 weight gradient of a channels-last depthwise 3x3 stride-2 convolution
    on a 1x1 map (the last extra block at 160 px) reads uninitialised memory for the taps that only see padding, so
    the weights became NaN now and then (the engine then stops: it never saves non-finite weights)."""
    config = tiny(tmp_path, data_root, amp=True, ema=True, grad_clip=1.0, max_steps=2, channels_last=False)
    trainer = Trainer(make_config(config), get_task("detection"))
    trainer.fit()
    assert all(map(torch.isfinite, torch.tensor(losses(tmp_path))))
    assert set(torch.load(tmp_path / "last.pt", weights_only=True)) >= {"model", "model_ema", "scaler", "class_names"}


def test_resume_refuses_another_layout_or_a_broken_file(tmp_path, data_root):
    task = get_task("detection")
    Trainer(make_config(tiny(tmp_path / "run", data_root, max_steps=2)), task).fit()
    with open(tmp_path / "run" / "log.jsonl", "a") as log:
        log.write('{"step": 3, "lo')  # a line cut short by a kill
    with pytest.raises(ValueError, match="steps per epoch.*keep batch_size, accumulate"):
        Trainer(make_config(tiny(tmp_path / "run", data_root, batch_size=4)), task, resume=str(tmp_path / "run"))
    assert Trainer(make_config(tiny(tmp_path / "run", data_root)), task, resume=str(tmp_path / "run")).step == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume from .*junk.pt"):
        Trainer(make_config(tiny(tmp_path / "other", data_root)), task, resume=str(tmp_path / "junk.pt"))
