"""timm's train.py / validate.py building blocks drive a registered model, as the README says they do.

The same calls as the scripts, in their order, on a tiny generated ImageFolder (2 classes x 4 images), on the CPU:
model and data config, datasets and loaders (augmenting, prefetching), optimizer, scheduler, EMA, the training step,
validation with ``timm.utils.accuracy`` (model and EMA), the checkpoint the saver writes and validate.py loads.
"""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, resolve_input_data_config
from timm.models import load_checkpoint, resolve_model_input_args
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, CheckpointSaver, ModelEmaV3, accuracy, random_seed

import mbbackbones  # noqa: F401  (registers the models)

NAME = "mbv3_small"
CPU = torch.device("cpu")
SCRIPT_ARGS = dict(img_size=64)  # what the scripts pass on from their command line (--img-size 64)


def image_folder(root, images_per_class=4, size=64):
    """``root/{train,val}/{red,blue}/*.png``: noisy images, reddish or bluish (a difference augmentation keeps)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, channel in (("blue", 2), ("red", 0)):
            (root / split / label).mkdir(parents=True)
            for i in range(images_per_class):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., channel] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"{i}.png")
    return root


def evaluate(model, loader) -> tuple[float, float]:
    """validate.py's loop: mean cross-entropy and top-1 (%) over the loader."""
    losses, top1 = AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            output = model(images)
            losses.update(torch.nn.functional.cross_entropy(output, targets).item(), len(images))
            top1.update(accuracy(output, targets, topk=(1,))[0].item(), len(images))
    return losses.avg, top1.avg


def test_train_and_validate_with_timm_building_blocks(tmp_path):
    random_seed(0)  # train.py's seeding: torch, numpy and random (timm's augmentations draw from random)
    root = image_folder(tmp_path / "data")
    # --bn-momentum 0.5: in 16 updates the running BatchNorm statistics that validation uses must catch up
    model = timm.create_model(**resolve_model_input_args(NAME, SCRIPT_ARGS, num_classes=2, bn_momentum=0.5,
                                                         drop_rate=0.0, global_pool=None, scriptable=False))
    data_config = resolve_input_data_config(model, SCRIPT_ARGS)
    assert data_config["input_size"] == (3, 64, 64)
    train_set = create_dataset("", root=str(root), split="train", is_training=True, batch_size=4)
    eval_set = create_dataset("", root=str(root), split="validation", batch_size=4)  # finds val/
    assert len(train_set) == len(eval_set) == 8 and train_set.reader.class_to_idx == {"blue": 0, "red": 1}
    loader_args = dict(input_size=data_config["input_size"], batch_size=4, interpolation=data_config["interpolation"],
                       mean=data_config["mean"], std=data_config["std"], num_workers=0, device=CPU)
    train_loader = create_loader(train_set, is_training=True, **loader_args)
    eval_loader = create_loader(eval_set, crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
                                **loader_args)

    epochs = 8
    optimizer = create_optimizer_v2(model, opt="adamw", lr=3e-3, weight_decay=0.05)
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1,
                                                warmup_lr=3e-4, updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=0.5, use_warmup=True)  # follows the last few of 16 updates (0.9998 needs 1000s)
    first_weights = model.stem.conv.weight.detach().clone()
    loss_fn = torch.nn.CrossEntropyLoss()
    losses, lrs, updates = [], [], 0
    for epoch in range(num_epochs):  # train.py's train_one_epoch
        model.train()
        for images, targets in train_loader:
            assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            ema.update(model, step=updates)
            scheduler.step_update(num_updates=updates)
            losses.append(loss.item())
            lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)

    assert all(np.isfinite(losses))
    assert not torch.equal(model.stem.conv.weight, first_weights)
    per_epoch = lrs[::len(train_loader)]  # the schedule steps on epochs, as train.py's default
    assert per_epoch[0] == 3e-4 and per_epoch[1] > 2e-3 and all(np.diff(per_epoch[1:]) < 0)  # warmup, cosine decay
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])  # measured: 0.68 -> 0.23
    assert not torch.equal(ema.module.stem.conv.weight, model.stem.conv.weight)
    _, top1 = evaluate(model, eval_loader)
    ema_loss, ema_top1 = evaluate(ema.module, eval_loader)
    assert top1 >= 75 and ema_top1 >= 75  # measured: 100 and 100 (50: chance)

    saver = CheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(num_epochs - 1, metric=ema_top1)
    validated = timm.create_model(NAME, num_classes=2)  # validate.py --checkpoint last.pth.tar --use-ema
    load_checkpoint(validated, str(tmp_path / "last.pth.tar"), use_ema=True)
    assert evaluate(validated, eval_loader) == pytest.approx((ema_loss, ema_top1))
