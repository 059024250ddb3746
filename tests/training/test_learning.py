"""Learning checks on real data, against torchvision's calibration runs (../shared/ANCHORS.md)."""
import pytest
import torch
from conftest import REAL

import heads
from heads.detection.coco import CocoDetection
from heads.detection.evaluate import evaluate, to_coco_results
from heads.segmentation.cityscapes import CLASS_NAMES, Cityscapes
from heads.segmentation.evaluate import ConfusionMatrix
from heads.training.engine import recalibrate_bn
from heads.training.tasks import SegmentationTask


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ssdlite320_mbv3_large_reduced", "ssdlite320_mbv4_conv_small"])
def test_ssdlite_overfits_the_real_coco_image(name):
    """torchvision's ssdlite320 (random init) reaches AP 0.713 / AP50 1.0 here after 300 Adam steps
    (batch 2 = the image and its flip, lr 1e-3) in ~80 s; ours must reach AP >= 0.6, AP50 >= 0.95 (MobileNetV4
    conv small: AP 0.813, AP50 1.0 measured)."""
    torch.manual_seed(0)
    dataset = CocoDetection(REAL / "coco_sample", "val2017", label_mode="coco91", train=True)
    image, target = dataset[0]
    width = image.shape[-1]
    flipped = {"boxes": target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0]), "labels": target["labels"]}
    model = heads.create_model(name, num_classes=dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(300):
        losses = model([image, image.flip(-1)], [target, flipped])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    with torch.no_grad():
        detections = model.eval()([image])
    metrics = evaluate(dataset.coco, to_coco_results(detections, [target["image_id"]], dataset.label_to_category))
    print(f"{name} on the real COCO image: AP {metrics.stats['AP']:.3f}, AP50 {metrics.stats['AP50']:.3f}")
    assert metrics.stats["AP"] >= 0.6 and metrics.stats["AP50"] >= 0.95, metrics.summary


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lraspp_mbv3_large", "lraspp_mbv4_conv_small"])
def test_lraspp_overfits_the_real_cityscapes_frame(name):
    """torchvision's lraspp_mobilenet_v3_large (random init) reaches mIoU 0.739 over the 10 train ids of
    this frame after 200 Adam steps (batch 2 = the frame and its flip, lr 1e-3) with re-estimated BN
    (MobileNetV4 conv small: 0.712 measured)."""
    torch.manual_seed(0)
    image, mask = Cityscapes(REAL / "cityscapes_sample", split=None)[0]
    batch = (torch.stack([image, image.flip(-1)]), torch.stack([mask, mask.flip(-1)]))
    model = heads.create_model(name, num_classes=19)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        loss = SegmentationTask.losses(model.train(), batch, "cpu")["cross_entropy"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recalibrate_bn(model, [batch], SegmentationTask, "cpu", 1)  # BN momentum 0.01 lags a 200-step fit
    confusion = ConfusionMatrix()
    with torch.no_grad():
        confusion.update(model(model.normalize(image[None]))[0].argmax(0), mask)
    metrics = confusion.compute()
    present = [CLASS_NAMES[i] for i in mask.unique().tolist() if i != 255]
    assert len(present) == 10
    miou = sum(metrics.per_class_iou[name] for name in present) / len(present)
    print(f"{name} on the real Cityscapes frame: mIoU {miou:.3f} over {len(present)} classes, "
          f"pixel accuracy {metrics.pixel_accuracy:.3f}")
    assert miou >= 0.65, metrics.table()
