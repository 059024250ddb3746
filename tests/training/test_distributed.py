"""Two gloo processes on the CPU, as torchrun runs them: evaluation shared out equals one process's, and a loss
that is not finite in one process stops both with the same message."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _evaluate(rank: int, world: int, port: int, data: str, results: dict) -> None:
    """Both tasks' evaluation of small untrained models on the built-in validation sets, in one process of many."""
    _as_rank(rank, world, port)
    os.environ["MBBACKBONES_DATA"] = data
    from heads import create_model
    from heads.detection.evaluate import detect_dataset
    from heads.training.config import make_config
    from heads.training.distributed import Distributed
    from heads.training.tasks import get_task

    env = Distributed("cpu")
    torch.manual_seed(0)
    for task_name, model_name in (("detection", "ssdlite320_mbv3_small_reduced"),
                                  ("segmentation", "lraspp_mbv3_small_reduced")):
        task = get_task(task_name)
        cfg = make_config({"task": task_name, "model": model_name, "eval_limit": 5, "workers": 0,
                           "batch_size": 2})
        _, val_set = task.datasets(cfg)
        model = create_model(model_name, num_classes=val_set.num_classes).eval()
        results[f"{task_name}/{rank}"] = task.evaluate(model, val_set, cfg, env)
        if task_name == "detection":
            results[f"detections/{rank}"] = detect_dataset(model, val_set, env.device, 2, cfg.eval_limit, 0, env)


def _evaluations(world: int, data) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_evaluate, (world, free_port(), str(data), results), nprocs=world)
        return dict(results)


def test_evaluation_shared_over_two_processes_equals_one_process(tmp_path):
    one, two = _evaluations(1, tmp_path), _evaluations(2, tmp_path)
    for task in ("detection", "segmentation"):
        assert two[f"{task}/0"] == two[f"{task}/1"] == one[f"{task}/0"], task  # every process gets the metrics
    assert one["segmentation/0"]["pixel_accuracy"] > 0
    (expected, expected_ids), (actual, actual_ids) = one["detections/0"], two["detections/0"]
    assert two["detections/1"] is None  # the first process scores
    assert sorted(actual_ids) == sorted(expected_ids) and len(expected_ids) == 5 and len(expected) > 0
    key = lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"])  # noqa: E731
    assert sorted(actual, key=key) == sorted(expected, key=key)


class _Points(torch.utils.data.Dataset):
    """Random 4-vectors, read by ``(index, seed)`` items as the engine's sampler gives them."""

    class_names = ["a", "b"]

    def __len__(self) -> int:
        return 16

    def __getitem__(self, item):
        return torch.randn(4, generator=torch.Generator().manual_seed(item[0]))


class _Diverging:
    """A task whose loss is not finite in the process of rank 1 only."""

    name, main_metric, outputs, defaults = "diverging", "loss", (), {}

    @staticmethod
    def check(cfg):
        pass

    @staticmethod
    def datasets(cfg):
        return _Points(), _Points()

    @staticmethod
    def model(cfg, train_set):
        model = nn.Linear(4, 2)
        model.meta = {}
        return model

    collate = staticmethod(torch.utils.data.default_collate)

    @staticmethod
    def losses(model, batch, device):
        scale = float("nan") if int(os.environ["RANK"]) == 1 else 1.0
        return {"loss": model(batch).square().mean() * scale}


def _diverge(rank: int, world: int, port: int, output: str, messages: dict) -> None:
    _as_rank(rank, world, port)
    from heads.training.config import make_config
    from heads.training.engine import Trainer

    cfg = make_config({"model": "ssdlite320_mbv3_small_reduced", "output": output, "batch_size": 2, "workers": 0,
                       "max_steps": 3, "channels_last": False, "tensorboard": False})
    try:
        Trainer(cfg, _Diverging).fit()
    except FloatingPointError as error:
        messages[rank] = str(error)


def test_a_loss_that_is_not_finite_in_one_process_stops_every_process_alike(tmp_path):
    with mp.Manager() as manager:
        messages = manager.dict()
        mp.spawn(_diverge, (2, free_port(), str(tmp_path / "run"), messages), nprocs=2)
        messages = dict(messages)
    assert messages[0] == messages[1]
    assert messages[0].startswith("step 0: the loss is not finite in 1 of 2 process(es) (loss nan)")
