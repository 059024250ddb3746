"""SSDLite (MobileNetV3 paper §6.2) on any registered backbone, with torchvision's detection I/O."""

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import batched_nms, box_iou

from mbbackbones.checkpoint import CheckpointError, convert
from mbbackbones.choices import ArgumentError
from mbbackbones.layers import ConvNormAct

from ..backbone import Normalize, plug_backbone
from ..deploy.tflite_metadata import AppMetadata, OutputTensor
from ..results import DRAW_SCORE, Detections
from ..task_model import Check, TaskModel, as_size


def extra_block(in_channels: int, out_channels: int, norm) -> nn.Sequential:
    """Halve the resolution: 1x1 to out/2 -> 3x3 depthwise stride 2 -> 1x1 to out, ReLU6 throughout."""
    mid = out_channels // 2
    conv = partial(ConvNormAct, act="relu6", norm=norm)
    return nn.Sequential(conv(in_channels, mid), conv(mid, mid, 3, stride=2, groups=mid), conv(mid, out_channels))


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """torchvision's SSDLite initialisation of conv layers (normal weights, zero bias)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class SSDLite(TaskModel):
    """SSDLite: heads on the C4 expansion tap (stride 16), C5 (stride 32) and four extra layers.

    Call it like a torchvision detector: in training, ``model(images, targets)`` returns the losses
    ``{"bbox_regression", "classification"}``; in eval, ``model(images)`` returns per image
    ``{"boxes" (xyxy, input pixels), "scores", "labels"}``. Images are 3xHxW floats in [0, 1] of any
    size; they are resized to ``size`` x ``size``. ``forward_batch`` is the plain tensor path for export
    (``torch.export``, ONNX); the model itself scripts (``torch.jit.script``) with the same I/O.

    Args:
        backbone: a registered mbbackbones name, built here with torchvision's SSDLite initialisation (normal,
            std 0.03) and its taps at the C4 expansion and C5; or a module with timm's ``features_only`` contract
            (``feature_info.channels()``, its feature maps in that order), used as it is.
        num_classes: classes including the background (label 0); 91 is torchvision's COCO space.
        extra_channels: output channels of the extra layers after the backbone's last map.
        norm_eps, norm_momentum: BatchNorm settings of the whole detector, a named backbone included
            (torchvision's SSDLite: 1e-3, 0.03).
        backbone_kwargs: passed to a named backbone (e.g. ``width``-specific options, ``drop_path_rate``).
    """

    task = "detection"
    result_type = Detections
    output_names = ("boxes", "scores")
    final_output_names = ("boxes", "scores", "labels", "count")
    app_output_names = ("locations", "categories", "scores", "num_detections")
    class_layers = ("head.classification_head.",)
    # LiteRT's int8 classification convolutions lose the ranking of the class scores (score correlation 0.55 with
    # float, AP50 -1.1 on the built-in set)
    float_layers = ("head.classification_head",)
    __jit_ignored_attributes__ = ["_anchors"]  # the eager cache of default boxes
    box_coder: BoxCoder  # typed for TorchScript, as torchvision's SSD
    matcher: Matcher

    def __init__(self, backbone: str | nn.Module = "mbv3_large_reduced", num_classes: int = 91, size: int = 320,
                 extra_channels: Sequence[int] = (512, 256, 256, 128), min_ratio: float = 0.2, max_ratio: float = 0.95,
                 iou_thresh: float = 0.5, neg_to_pos_ratio: int = 3, score_thresh: float = 0.001,
                 nms_thresh: float = 0.55, detections_per_img: int = 300, topk_candidates: int = 300,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 norm_eps: float = 1e-3, norm_momentum: float = 0.03, **backbone_kwargs):
        super().__init__()
        if num_classes < 2:
            raise ArgumentError(f"num_classes={num_classes} must count the background too (at least 2)")
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
        self.backbone_args = dict(feature_location="expansion", out_indices=(3, 4), norm_eps=norm_eps,
                                  norm_momentum=norm_momentum, **backbone_kwargs)
        self.backbone = plug_backbone(backbone, self.backbone_args, backbone_kwargs)
        channels = [*self.backbone.feature_info.channels(), *extra_channels]
        self.extra = nn.ModuleList(extra_block(c_in, c_out, norm) for c_in, c_out in zip(channels[1:], channels[2:]))
        self.anchor_generator = DefaultBoxGenerator([[2, 3]] * len(channels), min_ratio=min_ratio, max_ratio=max_ratio)
        self.head = SSDLiteHead(channels, self.anchor_generator.num_anchors_per_location(), num_classes, norm)
        normal_init(self.extra)
        if isinstance(backbone, str):
            normal_init(self.backbone)
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(iou_thresh, iou_thresh)
        self.size = size
        self.num_classes = num_classes
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.normalize = Normalize(image_mean, image_std)
        self._anchors: dict[tuple, Tensor] = {}

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        batch = torch.stack([self.resize(image) for image in images])
        if self.training:
            if targets is None:
                raise ValueError("SSDLite in training mode needs targets: model(images, targets)")
            scaled = [self._scale_target(target, size) for target, size in zip(targets, sizes)]
            return self.compute_loss(self.predict(batch), scaled)
        boxes, scores = self.forward_batch(batch)
        return [self.select(boxes[i], scores[i], sizes[i]) for i in range(len(sizes))]

    def resize(self, image: Tensor) -> Tensor:
        """A 3xHxW image in [0, 1] at the model size (bilinear, as torchvision's transform)."""
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"expected images as 3xHxW float tensors in [0, 1], got {image.dtype} "
                             f"{list(image.shape)}")
        if image.shape[-2] == self.size and image.shape[-1] == self.size:
            return image
        return F.interpolate(image[None], size=[self.size, self.size], mode="bilinear", align_corners=False)[0]

    def _scale_target(self, target: Dict[str, Tensor], size: Tuple[int, int]) -> Dict[str, Tensor]:
        boxes = target["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target boxes must be [N, 4] xyxy, got {list(boxes.shape)}")
        if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            listed = torch.jit.annotate(List[List[float]], boxes.tolist())
            raise ValueError(f"degenerate box (x2 <= x1 or y2 <= y1) in a target: {listed}")
        scale = torch.tensor([self.size / size[1], self.size / size[0]], dtype=boxes.dtype, device=boxes.device)
        return {"boxes": boxes * scale.repeat(2), "labels": target["labels"]}

    def predict(self, batch: Tensor) -> Dict[str, Tensor]:
        """Raw head outputs for images at the model size, in [0, 1] (or uint8): box deltas [B, A, 4], logits
        [B, A, C], and the default boxes [A, 4] (float32, as the normalised images)."""
        images = self.normalize(batch)
        features = self.backbone(images)
        assert isinstance(features, list)  # narrows timm's Union return type for TorchScript
        x = features[-1]
        for block in self.extra:
            x = block(x)
            features.append(x)
        out = self.head(features)
        out["anchors"] = self.anchors(batch.shape[-2:], [f.shape[-2:] for f in features], images)
        return out

    def anchors(self, image_size: List[int], grid_sizes: List[List[int]], like: Tensor) -> Tensor:
        """Default boxes in xyxy input pixels, cached per input and feature map sizes (when not scripted)."""
        if torch.jit.is_scripting():
            return self._default_boxes(image_size, grid_sizes, like)
        key = (tuple(image_size), *map(tuple, grid_sizes), like.dtype, like.device)
        if key not in self._anchors:
            self._anchors[key] = self._default_boxes(image_size, grid_sizes, like)
        return self._anchors[key]

    def _default_boxes(self, image_size: List[int], grid_sizes: List[List[int]], like: Tensor) -> Tensor:
        maps = [like.new_empty([0, 0, grid[0], grid[1]]) for grid in grid_sizes]
        return self.anchor_generator(ImageList(like[:1], [(image_size[0], image_size[1])]), maps)[0]

    def decode(self, head: Dict[str, Tensor], image_size: List[int]) -> Tuple[Tensor, Tensor]:
        """Boxes [B, A, 4] clipped to the image and class probabilities [B, A, C], all images at once."""
        deltas, anchors = head["bbox_regression"], head["anchors"]
        boxes = self.box_coder.decode_single(deltas.reshape(-1, 4), anchors.repeat(deltas.shape[0], 1))
        height, width = image_size[0], image_size[1]
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limits).view_as(deltas)
        return boxes, head["cls_logits"].softmax(-1)

    def forward_batch(self, batch: Tensor) -> Tuple[Tensor, Tensor]:
        """Export path: [B, 3, size, size] uint8 or in [0, 1] -> decoded boxes [B, A, 4] and probabilities
        [B, A, C]."""
        return self.decode(self.predict(batch), batch.shape[-2:])

    @torch.jit.unused
    def forward_postprocessed(self, images: Tensor, nms_op: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Export path with the post-processing inside: RGB uint8 [B, size, size, 3] -> :func:`final_detections`
        with this model's settings (``nms_op``: ONNX's ``NonMaxSuppression``; else :func:`tensor_nms`)."""
        boxes, scores = self.forward_batch(images.permute(0, 3, 1, 2))
        return final_detections(boxes, scores, **self.settings(), nms_op=nms_op)

    @torch.jit.unused
    def forward_app(self, images: Tensor, nms_op: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Export path of apps (MediaPipe's ``ObjectDetector``, the TFLite detection convention): RGB uint8
        [B, size, size, 3] -> :meth:`forward_postprocessed`'s detections as ``locations`` [B, D, 4] (ymin, xmin, ymax,
        xmax as ratios of the input), ``categories`` [B, D] (float32: the label - 1, an index into the foreground
        categories), ``scores`` [B, D] and ``num_detections`` [B] (float32)."""
        boxes, scores, labels, count = self.forward_postprocessed(images, nms_op)
        height, width = images.shape[1], images.shape[2]
        x0, y0, x1, y1 = boxes.unbind(-1)
        locations = torch.stack([y0 / height, x0 / width, y1 / height, x1 / width], -1)
        return locations, (labels - 1).clamp(min=0).float(), scores, count.float()

    @torch.jit.unused
    def app_metadata(self, meta: dict) -> AppMetadata:
        detections = ("location", "category", "score")
        outputs = (OutputTensor("location", "Boxes [ymin, xmin, ymax, xmax], ratios of the input", content="boxes",
                                axes=(2, 2), box_index=(1, 0, 3, 2)),
                   OutputTensor("category", "The label - 1: a line of the label file", axes=(2, 2),
                                labels=tuple(meta["categories"][1:])),
                   OutputTensor("score", "Scores, best first", axes=(2, 2)),
                   OutputTensor("number of detections", "How many detections are valid"))
        return AppMetadata("ObjectDetector", f"{meta.get('name') or 'SSDLite'}: objects and their boxes", outputs,
                           groups=(("detection_result", detections),))

    @torch.jit.unused
    def settings(self) -> dict:
        """The settings of :func:`select_detections`, as the model's metadata records them."""
        return dict(score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                    topk_candidates=self.topk_candidates, detections_per_img=self.detections_per_img)

    @torch.jit.unused
    def metadata(self) -> dict:
        """What the model's metadata says of it: label 0 is the background, images are resized to its square."""
        return dict(categories=["__background__", *(f"class {i}" for i in range(1, self.num_classes))],
                    input_size=[self.size, self.size], postprocess=self.settings(),
                    feature_location=getattr(self.backbone, "feature_location", None))

    @torch.jit.unused
    def export_size(self, size: int | Sequence[int] | None = None) -> Tuple[int, int]:
        height, width = as_size(self.size if size is None else size)
        if (height, width) != (self.size, self.size):
            raise ArgumentError(f"SSDLite exports at its own size {self.size}x{self.size}, not {height}x{width}")
        return height, width

    @staticmethod
    def input_size(meta: dict, height: int, width: int) -> Tuple[int, int]:
        return tuple(meta["input_size"])

    @staticmethod
    def results(outputs: Sequence[Tensor], meta: dict, input_size: Sequence[int],
                original_size: Sequence[int]) -> dict:
        """Detections in ``original_size`` pixels: :func:`select_detections` on :meth:`forward_batch`'s outputs, or
        the first ``count`` of :meth:`forward_postprocessed`'s (or of :meth:`forward_app`'s, where ``meta["outputs"]``
        names those), of which a raised ``score_thresh`` or a lowered ``detections_per_img`` keep fewer."""
        settings = meta["postprocess"]
        if meta.get("outputs") == list(SSDLite.app_output_names):
            outputs = from_app(outputs, input_size)
        if meta.get("postprocessed"):
            boxes, scores, labels, count = outputs
            keep = (scores[:int(count)] > settings["score_thresh"]).nonzero().squeeze(1)
            keep = keep[:settings["detections_per_img"]]
            found = {"boxes": to_original(boxes[keep], tuple(original_size), int(input_size[0])),
                     "scores": scores[keep], "labels": labels[keep].long()}
        else:
            found = select_detections(*outputs, tuple(original_size), int(input_size[0]), **settings)
        return {**{key: value.cpu() for key, value in found.items()}, "draw_score": meta.get("draw_score", DRAW_SCORE)}

    @staticmethod
    def agreement(expected: Sequence[Tensor], got: Sequence[Tensor], meta: dict, int8: bool) -> list[Check]:
        """fp32 raw outputs: the largest box difference relative to the input size (fp32 rounding after the box
        decoding's exponential is ~1e-2 px at 320) and the largest probability difference; fp32 detections (the
        post-processing inside): the share of the top detections, either way, found in the other's with the same
        label, score and box (:data:`FP32_DETECTION`). INT8: the share of PyTorch's top detections found in the
        runtime's (same label, IoU)."""
        size = meta["input_size"]
        if not int8 and not meta.get("postprocessed"):
            return [Check("max |boxes difference| / input size", (got[0] - expected[0]).abs().max().item() / max(size),
                          FP32_BOX_TOLERANCE, True),
                    Check("max |scores difference|", (got[1] - expected[1]).abs().max().item(), FP32_SCORE_TOLERANCE,
                          True)]
        pick = lambda outputs, i: SSDLite.results([o[i] for o in outputs], meta, size, size)  # noqa: E731
        pairs = [(pick(expected, i), pick(got, i)) for i in range(len(got[0]))]
        if int8:
            top, among, iou, limit = INT8_DETECTION
            shares = [detection_agreement(theirs, ours, top, among, iou) for theirs, ours in pairs]
            return [Check(f"top-{top} detections found in its top {among}", sum(shares) / len(shares), limit, False)]
        top, tolerance, box_tolerance, limit = FP32_DETECTION
        shares = [min(detection_agreement(theirs, ours, top, tolerance=tolerance, box_tolerance=box_tolerance),
                      detection_agreement(ours, theirs, top, tolerance=tolerance, box_tolerance=box_tolerance))
                  for theirs, ours in pairs]
        return [Check(f"top-{top} detections found in the other's (score within {tolerance:g}, box within "
                      f"{box_tolerance:g} px)", min(shares), limit, False)]

    def select(self, boxes: Tensor, scores: Tensor, original_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """One image's detections from :meth:`forward_batch`'s outputs: :func:`select_detections` with this
        model's settings."""
        return select_detections(boxes, scores, original_size, self.size, self.score_thresh, self.nms_thresh,
                                 self.topk_candidates, self.detections_per_img)

    def match(self, iou: Tensor) -> Tensor:
        """torchvision's ``SSDMatcher`` (which TorchScript cannot compile): each anchor's box if their IoU reaches
        ``iou_thresh`` (else -1), and every box keeps its best anchor."""
        matches = self.matcher(iou)
        best_anchor = iou.max(dim=1).indices
        matches[best_anchor] = torch.arange(best_anchor.numel(), dtype=matches.dtype, device=matches.device)
        return matches

    def compute_loss(self, head: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Smooth-L1 on matched boxes and cross-entropy with 3:1 hard negative mining, over the foreground count."""
        anchors, deltas, logits = head["anchors"], head["bbox_regression"], head["cls_logits"]
        matched: List[Tensor] = []
        gt_boxes: List[Tensor] = []
        gt_labels: List[Tensor] = []
        for target in targets:
            boxes, labels = target["boxes"], target["labels"]
            if boxes.numel() == 0:
                matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device))
                boxes, labels = anchors.new_zeros((1, 4)), labels.new_zeros((1,))
            else:
                matched.append(self.match(box_iou(boxes, anchors)))
            gt_boxes.append(boxes[matched[-1].clamp(min=0)])
            gt_labels.append(labels[matched[-1].clamp(min=0)])
        foreground = torch.stack(matched) >= 0
        targets_regression = self.box_coder.encode_single(torch.stack(gt_boxes)[foreground],
                                                          anchors.expand_as(deltas)[foreground])
        bbox_loss = F.smooth_l1_loss(deltas[foreground], targets_regression, reduction="sum")
        cls_targets = torch.where(foreground, torch.stack(gt_labels), 0)
        cls_loss = F.cross_entropy(logits.flatten(0, 1), cls_targets.flatten(), reduction="none").view_as(cls_targets)
        negative_loss = cls_loss.masked_fill(foreground, -float("inf"))
        rank = negative_loss.sort(1, descending=True)[1].sort(1)[1]
        background = rank < self.neg_to_pos_ratio * foreground.sum(1, keepdim=True)
        count = max(1, int(foreground.sum()))
        return {"bbox_regression": bbox_loss / count,
                "classification": (cls_loss[foreground].sum() + cls_loss[background].sum()) / count}

    def convert_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Our state dict as is, or torchvision's ``ssdlite320_mobilenet_v3_large`` one renamed to ours."""
        if "backbone.model.stem.conv.weight" in state_dict:
            return dict(state_dict)
        if "backbone.features.0.0.0.weight" not in state_dict:
            raise CheckpointError(f"not an SSDLite state dict (first key {next(iter(state_dict), None)!r})")
        backbone = {k: v for k, v in state_dict.items() if k.startswith("backbone.features.")}
        renamed = convert(torchvision_backbone_keys(backbone), self.backbone.model)
        result = {f"backbone.model.{k}": v for k, v in renamed.items()}
        for key, value in state_dict.items():
            if key.startswith("backbone.extra."):
                key = re.sub(r"^backbone\.extra\.(\d+)\.(\d+)\.([01])\.", lambda m: (
                    f"extra.{m[1]}.{m[2]}.{'conv' if m[3] == '0' else 'bn'}."), key)
            if not key.startswith("backbone.features."):
                result[key] = value
        return result


FP32_BOX_TOLERANCE = 1e-4  # of the input size: 0.032 px at 320
FP32_SCORE_TOLERANCE = 1e-4
# the top 100, either way: score within 1e-4, box coordinates within 1e-2 px; 90% of them, as NMS keeps one of
# candidates whose scores are equal to float noise in its own order, and what that one suppresses differs too: untrained
# heads have many such (0.95 measured on random ones, 1.0 on a trained-like one)
FP32_DETECTION = (100, 1e-4, 1e-2, 0.9)
INT8_DETECTION = (10, 30, 0.5, 0.7)  # PyTorch's top 10 found in the runtime's top 30 (same label, IoU >= 0.5): 70%


def detection_agreement(expected: dict, got: dict, top: Optional[int] = None, among: Optional[int] = None,
                        iou: float = 0.5, tolerance: Optional[float] = None,
                        box_tolerance: Optional[float] = None) -> float:
    """The share of ``expected``'s first ``top`` detections (all: None) that ``got``'s first ``among`` hold: the same
    label and a box of IoU >= ``iou``; or, with ``tolerance``, the score within ``tolerance`` and each box coordinate
    within ``box_tolerance`` pixels (default: ``1e3 * tolerance``). 1 when ``expected`` has none."""
    expected = {key: expected[key][:top] for key in ("boxes", "scores", "labels")}
    got = {key: got[key][:among] for key in ("boxes", "scores", "labels")}
    if not len(expected["labels"]):
        return 1.0
    same = expected["labels"][:, None] == got["labels"][None]
    if tolerance is None:
        same &= box_iou(expected["boxes"], got["boxes"]) >= iou
    else:
        box_tolerance = 1e3 * tolerance if box_tolerance is None else box_tolerance
        rows = lambda d: torch.cat([d["scores"][:, None] / tolerance, d["boxes"] / box_tolerance], 1)  # noqa: E731
        same &= torch.cdist(rows(expected), rows(got), p=float("inf")) <= 1
    return same.any(1).float().mean().item()


def select_detections(boxes: Tensor, scores: Tensor, original_size: Tuple[int, int], size: int,
                      score_thresh: float, nms_thresh: float, topk_candidates: int,
                      detections_per_img: int) -> Dict[str, Tensor]:
    """One image's detections from decoded boxes [A, 4] (xyxy, ``size`` x ``size`` pixels) and class probabilities
    [A, C]: per-class top-k over the threshold, one batched NMS, boxes rescaled to ``original_size`` (H, W).

    Same result as torchvision's per-class loop, without the loop. Anchors with no class over the threshold cannot
    contribute and are dropped first, so a confident detector's few candidates cost little.
    """
    foreground = scores[:, 1:]
    anchors = (foreground.amax(1) > score_thresh).nonzero().squeeze(1)
    per_class = foreground[anchors].t().contiguous()  # class-major, like torchvision's loop (same order for ties)
    above = per_class > score_thresh
    if anchors.numel() and int(above.sum(1).max()) > topk_candidates:  # a class over its top-k: keep its best k
        top_scores, anchor_index = per_class.topk(topk_candidates, dim=1)
        label, rank = (top_scores > score_thresh).nonzero().unbind(1)
        index, candidate_scores = anchor_index[label, rank], top_scores[label, rank]
    else:  # every class's candidates are within its top-k
        label, index = above.nonzero().unbind(1)
        candidate_scores = per_class[label, index]
    candidates, labels = boxes[anchors[index]], label + 1
    kept = greedy_nms(candidates, candidate_scores, labels, nms_thresh, detections_per_img)
    return {"boxes": to_original(candidates[kept], original_size, size), "scores": candidate_scores[kept],
            "labels": labels[kept]}


def from_app(outputs: Sequence[Tensor], input_size: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:meth:`SSDLite.forward_app`'s outputs (one image's or a batch's) as :meth:`SSDLite.forward_postprocessed`'s."""
    locations, categories, scores, count = outputs
    height, width = float(input_size[0]), float(input_size[1])
    y0, x0, y1, x1 = locations.unbind(-1)
    boxes = torch.stack([x0 * width, y0 * height, x1 * width, y1 * height], -1)
    return boxes, scores, categories.round().int() + 1, count.round().int()


def to_original(boxes: Tensor, original_size: Tuple[int, int], size: int) -> Tensor:
    """Boxes in ``size`` x ``size`` input pixels scaled to an image of ``original_size`` (H, W)."""
    height, width = original_size
    return boxes * torch.tensor([width / size, height / size], dtype=boxes.dtype, device=boxes.device).repeat(2)


def greedy_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thresh: float, keep: int) -> Tensor:
    """Indices of the ``keep`` best boxes that survive per-class NMS, best first.

    Greedy NMS decides each box from the higher-scoring ones only, so NMS over the best ``n``
    candidates keeps exactly the first survivors of NMS over all of them: grow ``n`` until
    enough survive instead of suppressing among tens of thousands of low-score boxes.
    """
    count = keep + keep // 2  # NMS costs the square of its boxes: start near what survives, grow if too few do
    best = scores.topk(min(count, scores.numel())).indices
    kept = batched_nms(boxes[best], scores[best], labels[best], iou_thresh)
    while kept.numel() < keep and best.numel() < scores.numel():
        count *= 3
        best = scores.topk(min(count, scores.numel())).indices
        kept = batched_nms(boxes[best], scores[best], labels[best], iou_thresh)
    return best[kept[:keep]]


FINAL_CANDIDATES = 1000  # (anchor, class) pairs of each image that final_detections suppresses among, its best
TENSOR_NMS_ROUNDS = 12  # fixed-point rounds of tensor_nms: greedy NMS's decisions are final after as many as their
# chains of suppression are long (at most 4 on a trained-like detector, 9 on a random one)


def final_detections(boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float, topk_candidates: int,
                     detections_per_img: int, nms_op: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The detections of a batch, as :func:`select_detections` finds them, in tensor operations that export: from
    decoded boxes [B, A, 4] and probabilities [B, A, C] to ``boxes`` [B, D, 4] (xyxy, input pixels), ``scores``
    [B, D], ``labels`` [B, D] (int32) and ``count`` [B] (int32), ``D = detections_per_img``, each image's best first;
    entries past its ``count`` are zeros.

    Candidates are the best :data:`FINAL_CANDIDATES` (anchor, class) pairs over all classes, each class's first
    ``topk_candidates`` of them over the threshold: the same detections as :func:`select_detections` while they hold
    the image's ``D`` survivors of NMS (greedy NMS decides each box from better ones only), and one top-k over the
    pairs costs a tenth of a top-k per class. NMS: ONNX's ``NonMaxSuppression`` (``nms_op``, :class:`ClassNMS`) on
    boxes moved apart by class, else :func:`tensor_nms`.
    """
    classes = scores.shape[2] - 1
    count = min(max(FINAL_CANDIDATES, detections_per_img), scores.shape[1] * classes)
    # the best K pairs lie on the K anchors of best maximum (an anchor holding one has its maximum over the K-th score)
    foreground = scores[..., 1:]
    anchors = foreground.amax(2).topk(min(count, scores.shape[1]), dim=1).indices  # [B, K']
    pairs = foreground.gather(1, anchors[..., None].expand(-1, -1, classes))  # [B, K', C - 1]
    best, index = pairs.flatten(1).topk(count, dim=1)  # [B, K], best first
    # each pair's anchor and label, in float arithmetic (INT8 quantizers make integer scalars float constants): exact,
    # as a quotient of integers under 2^24 is correctly rounded and a remainder moves it by 1 / classes at least
    row = torch.floor(index.float() / classes)
    label = (index.float() - row * classes + 1).long()
    anchor = anchors.gather(1, row.long())
    candidates = boxes.gather(1, anchor[..., None].expand(-1, -1, 4))  # [B, K, 4]
    one_hot = (label[..., None] == torch.arange(1, classes + 1, device=scores.device)).float()  # [B, K, C - 1]
    rank = (one_hot.cumsum(1) * one_hot).sum(2)  # 1 for a class's best pair, 2 for its second, ...
    valid = (best > score_thresh) & (rank <= topk_candidates)
    if nms_op:
        apart = candidates + label[..., None] * (candidates.max() + 1)  # no overlap between classes
        image, _, kept = ClassNMS.apply(apart, torch.where(valid, best, torch.zeros_like(best))[:, None],
                                        detections_per_img, nms_thresh, score_thresh).unbind(1)
        keep = torch.zeros_like(valid).index_put((image, kept), torch.ones_like(kept, dtype=torch.bool))
    else:
        keep = tensor_nms(candidates, label, valid, nms_thresh)
    final, order = torch.where(keep, best, torch.full_like(best, -1.0)).topk(min(detections_per_img, count), dim=1)
    found = final >= 0
    pad = detections_per_img - final.shape[1]  # fewer candidates than D: zeros past them
    return (F.pad(candidates.gather(1, order[..., None].expand(-1, -1, 4)) * found[..., None], (0, 0, 0, pad)),
            F.pad(final.clamp(min=0), (0, pad)), F.pad((label.gather(1, order) * found).int(), (0, pad)),
            found.sum(1).int())


def tensor_nms(boxes: Tensor, labels: Tensor, valid: Tensor, iou_thresh: float) -> Tensor:
    """Greedy per-class NMS with matrix products alone (ExecuTorch and LiteRT have no NMS operator that their
    exporters emit): of boxes [B, K, 4] ordered best first, their ``labels`` and ``valid`` [B, K], which survive.

    Greedy NMS keeps a box if no kept, better box of its class overlaps it by more than ``iou_thresh``. From all valid
    boxes, each round re-decides every box from the previous round's keeps: the best box's decision is final after
    one round, any other's once those it depends on are, so :data:`TENSOR_NMS_ROUNDS` rounds give greedy NMS's result
    unless a chain of suppressions is longer.
    """
    x1, y1, x2, y2 = boxes[..., None, :].unbind(-1)  # [B, K, 1] each, against the others' [B, 1, K]
    width = (torch.minimum(x2, x2.transpose(1, 2)) - torch.maximum(x1, x1.transpose(1, 2))).clamp(min=0)
    height = (torch.minimum(y2, y2.transpose(1, 2)) - torch.maximum(y1, y1.transpose(1, 2))).clamp(min=0)
    area = (x2 - x1) * (y2 - y1)
    overlap = width * height
    iou = overlap / (area + area.transpose(1, 2) - overlap)
    better = torch.ones(boxes.shape[1], boxes.shape[1], dtype=torch.bool, device=boxes.device).tril(-1)  # j before i
    suppresses = ((iou > iou_thresh) & (labels[:, :, None] == labels[:, None, :]) & better).float()
    keep = valid
    for _ in range(TENSOR_NMS_ROUNDS):
        keep = valid & (torch.bmm(suppresses, keep.float()[..., None])[..., 0] == 0)
    return keep


class ClassNMS(torch.autograd.Function):
    """ONNX's ``NonMaxSuppression`` (exported as that operator; in PyTorch, :func:`class_nms`)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou_thresh: float,
                score_thresh: float) -> Tensor:
        return class_nms(boxes, scores, max_per_class, iou_thresh, score_thresh)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thresh: float, score_thresh: float):
        constant = lambda value, dtype: g.op("Constant", value_t=torch.tensor([value], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, constant(max_per_class, torch.int64),
                    constant(iou_thresh, torch.float32), constant(score_thresh, torch.float32))


def class_nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_thresh: float, score_thresh: float) -> Tensor:
    """What ONNX's ``NonMaxSuppression`` selects, by torchvision's NMS: of boxes [B, N, 4] (xyxy) and scores
    [B, C, N], per image and class the boxes over ``score_thresh`` that greedy NMS at ``iou_thresh`` keeps, at most
    ``max_per_class`` each, as rows (image, class, box) [M, 3] ordered by image, class, then score."""
    image, label, box = (scores > score_thresh).nonzero().unbind(1)
    group = image * scores.shape[1] + label
    kept = batched_nms(boxes[image, box], scores[image, label, box], group, iou_thresh)  # best first
    kept = kept[group[kept].sort(stable=True).indices]  # grouped, best first within each group
    groups = group[kept]
    rank = torch.arange(len(kept), device=kept.device) - torch.searchsorted(groups, groups)
    kept = kept[rank < max_per_class]
    return torch.stack([image[kept], label[kept], box[kept]], 1)


def torchvision_backbone_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision SSDLite backbone keys -> its MobileNetV3 ``features.*`` keys.

    torchvision splits the backbone at the C4 expansion: ``features.0`` holds the layers up to and
    including block ``c4``'s expansion, ``features.1.0`` the rest of that block, then the others.
    """
    c4 = max(int(m[1]) for k in state_dict if (m := re.match(r"backbone\.features\.0\.(\d+)\.", k)))

    def rename(key: str) -> str:
        part, index, rest = re.match(r"backbone\.features\.([01])\.(\d+)\.(.+)", key).groups()
        index = int(index)
        if part == "0":
            return f"features.{index}.block.0.{rest}" if index == c4 else f"features.{index}.{rest}"
        if index == 0:
            sub, rest = rest.split(".", 1)
            return f"features.{c4}.block.{int(sub) + 1}.{rest}"
        return f"features.{c4 + index}.{rest}"

    return {rename(k): v for k, v in state_dict.items()}
