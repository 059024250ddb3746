"""Runs from Python and the command line: their folders are never overwritten, failed starts touch nothing, best.pt
and TensorBoard logs, and every bad input is one line that names it."""
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import heads
from heads.cli import train_main
from heads.training.config import ConfigError, load_config
from heads.training.run import RunError, claim, lock_for_resume
from mbbackbones.checkpoint import CheckpointError

TINY = dict(model="ssdlite320_mbv3_small_reduced", model_kwargs={"size": 160}, batch_size=2, workers=0,
            optimizer="adam", lr=1e-3, lr_batch=2, warmup_steps=0, epochs=1, max_steps=3, eval_limit=3,
            log_every=1)


pytestmark = pytest.mark.usefixtures("data_home")  # built-in sets written under a temporary folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return heads.train(dict(TINY, output=str(tmp_path_factory.mktemp("runs") / "tiny")))


def digests(folder: Path) -> dict[str, str]:
    """The run's files (not its lock) and their hashes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


def test_train_returns_the_run_with_its_best_checkpoint(run, capsys):
    assert run.steps == 3 and set(run.metrics) >= {"AP", "AP50"} and run.best == run.folder / "best.pt"
    model = heads.create_model("ssdlite320_mbv3_small_reduced", pretrained=run.best)
    assert model.meta["categories"][1:] == ["circle", "square", "triangle", "cross", "star"]
    assert model.meta["dataset_ids"] == [None, 3, 7, 12, 20, 41] and model.meta["model_kwargs"] == {"size": 160}
    assert set(model.meta) == set(heads.create_model("ssdlite320_mbv3_large_reduced").meta)  # published files' too
    assert model.meta["metrics"] == {"builtin/val2017": run.metrics}
    predicted = heads.Predictor(run.folder)(heads.SAMPLE_IMAGES["3dogs"])[0]
    assert predicted.categories == model.meta["categories"] and predicted.boxes.shape[1] == 4


def test_a_second_run_into_the_same_folder_leaves_the_first_untouched(run, capsys):
    before = digests(run.folder)
    second = heads.train(dict(TINY, max_steps=1, output=str(run.folder)))
    assert second.folder == run.folder.with_name("tiny-2") and digests(run.folder) == before
    assert f"{run.folder} holds another run: this run writes {second.folder}" in capsys.readouterr().out


def _claim(output: str, folders) -> None:
    folder, lock = claim(Path(output))
    folders.append(str(folder))
    lock.held = False  # keep the lock file after this process exits, as a running run would


def test_two_processes_starting_at_once_take_different_folders(tmp_path):
    with mp.Manager() as manager:
        folders = manager.list()
        processes = [mp.get_context("spawn").Process(target=_claim, args=(str(tmp_path / "x"), folders))
                     for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        assert sorted(folders) == [str(tmp_path / "x"), str(tmp_path / "x-2")]


def test_a_lock_is_respected_while_its_process_lives_and_taken_over_after_a_crash(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        folder, lock = claim(tmp_path / "busy")
        assert folder == tmp_path / "busy-2"
        lock.release()
        with pytest.raises(RunError, match=f"busy is in use by {sleeper.pid}"):
            lock_for_resume(tmp_path / "busy")
    finally:
        sleeper.kill()
        sleeper.wait()
    folder, lock = claim(tmp_path / "busy")  # its process is gone: the lock is stale
    assert folder == tmp_path / "busy" and (folder / ".lock").read_text().startswith(str(os.getpid()))
    lock.release()
    assert not (folder / ".lock").exists()


def test_tensorboard_event_files_are_readable(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.folder), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/AP", "val/AP50"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    assert events.Scalars("val/AP")[-1].value == pytest.approx(run.metrics["AP"])
    assert "val/predictions" in tags["images"]


def test_a_failed_start_touches_no_run(run, tmp_path):
    before = digests(run.folder)
    with pytest.raises(heads.DataError, match="COCO path not found"):
        heads.train(dict(TINY, dataset="coco", data_root=str(tmp_path / "nowhere"), output=str(run.folder)))
    with pytest.raises(ValueError, match="batch_size 2 -> 4"):
        heads.train(dict(TINY, batch_size=4, output=str(run.folder)), resume=run.folder)
    assert digests(run.folder) == before and not run.folder.with_name("tiny-3").exists()


def _disk_full(obj, file):
    """torch.save on a full disk: its write fails with ENOSPC."""
    file.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_in_torch(obj, file):
    """torch.save on a full disk, as torch reports it: the ENOSPC of the file's write becomes the context of a
    RuntimeError from its zip writer (seen on a 1 MB tmpfs)."""
    try:
        _disk_full(obj, file)
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def _torch_error(obj, file):
    """The same RuntimeError without the OSError behind it."""
    file.write(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.fixture
def trainer(tmp_path):
    """A trainer that has written its first last.pt (step 0)."""
    from heads.training.engine import Trainer
    from heads.training.tasks import get_task

    trainer = Trainer(load_config(None, dict(TINY, output=str(tmp_path / "full")), task="detection"),
                      get_task("detection"))
    trainer.save()
    yield trainer
    trainer.close()


@pytest.mark.parametrize("save, free", [(_disk_full, None), (_disk_full_in_torch, None), (_torch_error, 1000)])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(trainer, save, free, monkeypatch):
    before = digests(trainer.output)
    monkeypatch.setattr(torch, "save", save)
    if free is not None:  # bytes left on the disk
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(RunError) as error:
        trainer.save()
    disk = trainer.output.resolve()
    while not os.path.ismount(disk):
        disk = disk.parent
    assert str(error.value).startswith(f"no space left on {disk} (the disk of {trainer.output}): could not write "
                                       f"{trainer.output / 'last.pt'} (")
    assert str(error.value).endswith("; the previous last.pt (step 0) is intact: free some space, then resume")
    assert digests(trainer.output) == before and not list(trainer.output.glob(".*.tmp"))


def test_a_torch_error_on_a_disk_with_room_keeps_its_traceback(trainer, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_error)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        trainer.save()


def test_weights_that_are_no_longer_finite_are_never_saved(tmp_path):
    """An absurd lr: step 1 (at a warm-up factor of 1e-39) is sane, step 2's update overflows the weights to inf.
    The loss only shows it at step 3: a checkpoint written in between used to replace the good last.pt."""
    with pytest.raises(FloatingPointError) as error:
        heads.train(dict(TINY, optimizer="sgd", lr=1e39, warmup_steps=3, warmup_factor=1e-39, checkpoint_every=1,
                         max_steps=6, output=str(tmp_path / "run")))
    assert str(error.value).startswith("the weights are not finite after step 2 (") and "\n" not in str(error.value)
    assert f"{tmp_path / 'run' / 'last.pt'} is kept from step 1" in str(error.value)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 1
    assert all(value.isfinite().all() for value in state["model"].values() if value.is_floating_point())


@pytest.mark.parametrize("overrides, message", [
    (["--epochs", "0"], "command line: epochs must be >= 1, got 0"),
    (["--batch_size", "0"], "command line: batch_size must be >= 1, got 0"),
    (["--checkpoint_every", "0"], "command line: checkpoint_every must be >= 1, got 0"),
    (["--lr", "-0.1"], "command line: lr must be > 0, got -0.1"),
    (["--epochs", "one"], "command line: epochs must be an integer, got 'one'"),
    (["--lr"], "command line: --lr needs a value"),
    (["--optimizer", "adamm"], "command line: optimizer must be one of sgd, adam, adamw, got 'adamm'. Did you mean "
                               "'adam'?"),
    (["--device", "gpu"], "command line: device must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    (["--crop_size", "[0, 512]"], "command line: crop_size must be two positive integers [height, width]"),
    (["--lr", "inf"], "command line: lr must be a finite number, got inf"),
    (["--grad-clip", "nan"], "command line: grad_clip must be a finite number, got nan"),
    (["--lr", "1e-3x"], "command line: lr must be a number, got '1e-3x'"),
])
def test_config_values_are_checked_where_they_come_from(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv, key, value", [
    (["--lr", "1e-3"], "lr", 1e-3),  # YAML 1.1 reads an exponent without a dot as a string
    (["--weight-decay", "4e-05"], "weight_decay", 4e-5),  # the default, as --help prints it
    (["--lr=1E3"], "lr", 1e3),
    (["--lr", "+2.5e-2"], "lr", 0.025),
    (["--grad-clip", ".5"], "grad_clip", 0.5),
    (["--train-split", "1e3"], "train_split", "1e3"),  # a string field keeps the text, whatever it looks like
    (["--train-split", "2017"], "train_split", "2017"),
    (["--pretrained", "1"], "pretrained", "1"),
])
def test_every_float_spelling_is_a_number_and_strings_stay_strings(argv, key, value):
    assert getattr(load_config(None, argv), key) == value


def test_float_spellings_in_a_file_are_numbers(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nweight_decay: 4E-05\nwarmup_factor: 1e-3\nval_split: 1e3\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_factor, cfg.val_split) == (1e-3, 4e-5, 1e-3, "1e3")
    (tmp_path / "run.yaml").write_text("lr: .inf\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: lr must be a finite number, got inf$"):
        load_config(tmp_path / "run.yaml")


def test_file_values_are_blamed_on_the_file_and_dashes_survive(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: epochs must be >= 1, got 0"):
        load_config(tmp_path / "run.yaml")
    cfg = load_config(None, ["--data-root=/data/my-coco", "--amp", "--output", "runs/a-b"])
    assert (cfg.data_root, cfg.amp, cfg.output) == ("/data/my-coco", True, "runs/a-b")


@pytest.mark.parametrize("argv, message", [
    (["--model_kwargs", "{num_classes: 3}"], "model_kwargs: num_classes comes from the dataset; remove it"),
    (["--model", "lraspp_mbv3_large"], "model lraspp_mbv3_large is a segmentation model, not a detection one: "
                                       "train it with tools/train_seg.py"),
    (["--data_root", "/data/coco"], "data_root is /data/coco but dataset is builtin"),
    (["--device", "cuda"], "device: cuda, but this machine has no usable CUDA GPU"),
    (["--batch_size", "100000"], "fewer than one global batch of 100000"),
    (["--model_kwargs", "{pooling: max}"], "unknown argument(s) pooling"),
])
def test_training_mistakes_are_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*argv, "--output", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    assert message in error
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from heads.training import tasks

    def broken(model, batch, device):
        raise ValueError("a bug deep in training")

    monkeypatch.setattr(tasks.DetectionTask, "losses", staticmethod(broken))
    with pytest.raises(ValueError, match="a bug deep in training"):  # not SystemExit(2) with "error: ..."
        train_main(["--max_steps", "1", "--batch_size", "2", "--workers", "0", "--output", str(tmp_path / "run")])


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of 3 steps stopped after step 1, as by a crash: its last.pt is from step 1."""
    from heads.training.config import make_config
    from heads.training.engine import Trainer
    from heads.training.tasks import get_task

    def stop(trainer):
        if trainer.step == 1:
            raise Interrupt

    folder = tmp_path_factory.mktemp("runs") / "stopped"
    with pytest.raises(Interrupt):
        Trainer(make_config(dict(TINY, checkpoint_every=1, output=str(folder))), get_task("detection"),
                callback=stop).fit()
    return folder


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0.03"], "lr 0.001 -> 0.03"),
    (["--lr", "1e-3", "--batch-size", "4", "--workers", "1"], "batch_size 2 -> 4;"),  # the lr is the same
    (["--model", "ssdlite320_mbv3_large_reduced"], "model ssdlite320_mbv3_small_reduced -> "
                                                   "ssdlite320_mbv3_large_reduced"),
    (["--max-steps", "5", "--ema", "--eval-limit", "2"], "max_steps 3 -> 5, ema false -> true;"),
])
def test_resume_refuses_keys_that_change_the_training(stopped, argv, message, capsys):
    before = digests(stopped)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", str(stopped), *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"error: cannot resume {stopped} with other values of ") and message in error
    assert digests(stopped) == before


def test_resume_from_python_refuses_them_too(stopped):
    with pytest.raises(ConfigError, match="lr 0.001 -> 0.03"):
        heads.train(dict(TINY, lr=0.03), resume=stopped)


def test_resume_without_a_config_continues_the_runs_own_and_applies_runtime_keys(stopped, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(stopped, tmp_path / "stopped")
    run = train_main(["--resume", str(folder), "--eval-limit", "2", "--tensorboard", "false"])
    assert f"resuming {folder} with eval_limit 3 -> 2, tensorboard true -> false" in capsys.readouterr().out
    assert run.folder == folder and run.steps == 3
    config = torch.load(folder / "last.pt", weights_only=True)["config"]
    assert (config["batch_size"], config["lr"], config["eval_limit"], config["tensorboard"]) == (2, 1e-3, 2, False)


def test_resume_of_another_task_or_model_names_both(stopped, tmp_path, capsys):
    from heads.training.config import make_config
    from heads.training.engine import Trainer
    from heads.training.tasks import get_task

    with pytest.raises(SystemExit):
        train_main(["--resume", str(stopped)], task="segmentation")
    assert capsys.readouterr().err == (f"error: {stopped}: task is detection; this tool trains segmentation models "
                                       "(use tools/train_det.py)\n")
    other = make_config(dict(TINY, model="ssdlite320_mbv3_large_reduced", output=str(tmp_path)))
    with pytest.raises(CheckpointError) as error:  # the engine itself, given another model's config
        Trainer(other, get_task("detection"), resume=stopped)
    assert str(error.value) == (f"cannot resume from {stopped / 'last.pt'}: it holds a ssdlite320_mbv3_small_reduced "
                                "{'size': 160}, this run trains ssdlite320_mbv3_large_reduced {'size': 160}")


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    for key in ("--epochs", "--crop_size", "--train_annotations", "--tensorboard"):
        assert key in text
    assert "passes over the training set (default: 660)" in text


def test_the_last_progress_bar_ends_full(tmp_path, capsys):
    heads.train(dict(TINY, max_steps=3, output=str(tmp_path / "run")))
    last = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("epoch")][-1]
    assert "100%" in last and "3/3" in last


def _builtin_with(tmp_path: Path, split: str, keep) -> dict:
    """Config keys that read the built-in set's ``split`` with only the annotations ``keep(annotation, image_ids)``
    accepts (``image_ids``: the split's, sorted), from a copy of its annotation file."""
    import json

    from heads.detection.builtin import builtin_coco

    root = builtin_coco()
    dataset = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    image_ids = sorted(image["id"] for image in dataset["images"])
    dataset["annotations"] = [a for a in dataset["annotations"] if keep(a, image_ids)]
    kind = "train" if split.startswith("train") else "val"
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(dataset))
    return {f"{kind}_images": str(root / split), f"{kind}_annotations": str(path)}


@pytest.mark.parametrize("split, purpose", [("train2017", "train on"), ("val2017", "evaluate against")])
def test_a_coco_set_without_annotations_stops_before_the_run_starts(split, purpose, tmp_path):
    """Before, training on it 'worked': a loss of exactly 0, AP -1 and a best.pt saved at AP -1."""
    paths = {**_builtin_with(tmp_path, "train2017", lambda a, ids: True),
             **_builtin_with(tmp_path, "val2017", lambda a, ids: True), **_builtin_with(tmp_path, split, lambda *_: 0)}
    with pytest.raises(heads.DataError) as error:
        heads.train(dict(TINY, dataset="coco", **paths, output=str(tmp_path / "run")))
    name = "train.json" if split == "train2017" else "val.json"
    assert str(error.value).startswith(f"{tmp_path / name}: no annotations to {purpose}")
    assert not (tmp_path / "run").exists()


def test_evaluated_images_without_ground_truth_give_no_score(tmp_path, capsys):
    """COCOeval's AP is -1 ("nothing to measure") when the evaluated images hold no box: never a best score."""
    paths = {**_builtin_with(tmp_path, "train2017", lambda a, ids: True),
             **_builtin_with(tmp_path, "val2017", lambda a, ids: a["image_id"] != ids[0])}
    run = heads.train(dict(TINY, dataset="coco", **paths, eval_limit=1, max_steps=1, output=str(tmp_path / "run")))
    assert run.metrics["AP"] == -1 and run.best is None
    printed = capsys.readouterr().out
    assert "AP: no ground truth in the evaluated images; best.pt is not updated" in printed
    assert "done: 1 steps; AP = no ground truth (best none)" in printed
