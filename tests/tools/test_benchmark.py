"""The benchmark compares equal work (same architecture, same outputs) and its quick mode runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from benchmarking.harness import COUNTERPARTS, FEATURE_ROWS, outside_share
from benchmarking.workloads import (
    DETECTOR,
    QUICK,
    SEGMENTER,
    V4_DETECTOR,
    V4_SEGMENTER,
    as_inputs,
    calibrated_detector,
    deployment_workloads,
    detection_workloads,
    seeded_model,
    segmentation_workloads,
    to_tensor,
)
from conftest import same_detections

from heads.assets import SAMPLE_IMAGES
from heads.data import read_image
from heads.detection.ssdlite import detection_agreement
from heads.results import Detections, Timings
from mbbackbones.profile import count_params

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [read_image(SAMPLE_IMAGES[name]) for name in ("3dogs", "kitten")]


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
def test_counterparts_are_the_same_architecture(name):
    assert count_params(COUNTERPARTS[name][1]()) == count_params(timm.create_model(name))


@pytest.mark.parametrize("name", sorted(FEATURE_ROWS))
def test_feature_rows_compare_equal_extractors(name):
    ours = timm.create_model(name, features_only=True)
    assert count_params(ours) == count_params(FEATURE_ROWS[name][1]())


def as_dicts(results) -> list[dict]:
    """Predictor results as torchvision's detection dicts."""
    return [r if isinstance(r, dict) else {"boxes": r.boxes, "scores": r.scores, "labels": r.labels}
            for r in results]


def masks(results) -> torch.Tensor:
    return results if isinstance(results, torch.Tensor) else torch.stack([torch.from_numpy(r.mask) for r in results])


def predicted_on_the_uint8_photo(model, photo) -> dict:
    """What ``heads.Predictor`` should give for ``photo``: the network on the photo resized once in uint8."""
    batch = F.interpolate(torch.from_numpy(photo).permute(2, 0, 1)[None], size=(320, 320), mode="bilinear")
    boxes, scores = model.forward_batch(batch.float() / 255)
    return model.select(boxes[0], scores[0], photo.shape[:2])


@torch.inference_mode()
def test_detection_rows_give_torchvisions_detections():
    workloads = list(detection_workloads(PHOTOS, batches=(2,), size=QUICK.detect_size, background_logits=(0.0, 9.0)))
    loads = [int(w.input.split(", ")[1].split()[0].replace(",", "")) for w in workloads]
    assert loads[0] > 0.9 * 3234 * 90 and loads[1] < 0.1 * loads[0]  # a random head vs a confident background
    for workload in workloads:
        expected = workload.reference_call()
        assert len(expected) == 2 and all(len(e["boxes"]) > 0 for e in expected)
        assert len(torch.unique(expected[0]["scores"])) > 100  # no ties from a collapsed network
        model, predictor, v4_model, v4_predictor = workload.contenders
        assert [(c.model, c.variant, c.target) for c in workload.contenders] == [
            (DETECTOR, "model", None), (DETECTOR, "Predictor", 0.5), (V4_DETECTOR, "model", None),
            (V4_DETECTOR, "Predictor", None)]
        assert all(same_detections(e, a, limit=300) for e, a in zip(expected, model.call()))  # the same tensors in
        for network, predicted in ((model, predictor), (v4_model, v4_predictor)):
            ours, photos = network.call.args
            for photo, actual in zip(photos, as_dicts(predicted.call())):  # the photo resized once, in uint8
                assert same_detections(predicted_on_the_uint8_photo(ours, photo), actual, limit=300)


@torch.inference_mode()
def test_segmentation_rows_give_torchvisions_masks():
    for workload in segmentation_workloads(PHOTOS, QUICK.segment_shapes):
        expected = workload.reference_call()
        assert expected.shape == (1, *QUICK.segment_shapes[0][0])
        model, predictor, v4_model, v4_predictor = workload.contenders
        assert predictor.madds_m == model.madds_m == pytest.approx(3950 * 128 * 256 / (1024 * 512), rel=0.01)
        assert v4_model.madds_m == pytest.approx(14170 * 128 * 256 / (2048 * 1024), rel=0.01)  # the README table's
        assert torch.equal(model.call(), expected)
        assert (masks(predictor.call()) == expected).float().mean() > 0.99
        assert v4_model.model == V4_SEGMENTER and (masks(v4_predictor.call()) == v4_model.call()).float().mean() > 0.99


@torch.inference_mode()
def test_deployment_rows_do_the_same_work():
    *classify, detect, segment = deployment_workloads(PHOTOS, QUICK.classify_size, QUICK.detect_size,
                                                      QUICK.background_logits, QUICK.deploy_segment,
                                                      QUICK.deploy_formats, QUICK.deploy_classifiers, warmup=0)
    variants = [f"{format} {precision}" for format in QUICK.deploy_formats for precision in ("fp32", "int8")]
    assert [(c.model, c.variant) for c in detect.contenders] == [(DETECTOR, v) for v in variants] + [
        (V4_DETECTOR, v) for v in variants]
    assert [c.target for c in detect.contenders] == [0.2, 0.1] * len(QUICK.deploy_formats) + [None] * len(variants)
    assert [w.reference for w in classify] == ["torchvision mobilenet_v3_large", "timm mobilenetv4_conv_small"]
    for workload in classify:  # ours carries the reference's weights
        torch.testing.assert_close(workload.contenders[0].call(), workload.reference_call(), rtol=1e-4, atol=1e-4)
    reference, (photo,) = detect.reference_call.args  # torchvision on the photo as the predictors resize it
    batch = F.interpolate(torch.from_numpy(photo).permute(2, 0, 1)[None], size=(320, 320), mode="bilinear")
    expected = reference([batch[0].float() / 255])[0]
    expected["boxes"] *= torch.tensor([photo.shape[1] / 320, photo.shape[0] / 320] * 2)
    v4_network = calibrated_detector(V4_DETECTOR, as_inputs(PHOTOS, QUICK.detect_size), QUICK.background_logits[0])
    for contender in detect.contenders:
        got = as_dicts(contender.call())[0]
        if "fp32" in contender.variant:  # (INT8 against float: tests/deploy/test_runtimes.py, on suitable models)
            wanted = expected if contender.model == DETECTOR else predicted_on_the_uint8_photo(v4_network, photo)
            assert detection_agreement(wanted, got, top=20, among=100, iou=0.9) >= 0.9, contender.variant
        assert len(got["boxes"]) > 0 and (got["boxes"][:, 2:] <= torch.tensor(photo.shape[1::-1]) + 1e-3).all()
    expected = {SEGMENTER: segment.reference_call()}
    v4_network = seeded_model(V4_SEGMENTER, num_classes=19)
    photos = torch.stack([to_tensor(photo) for photo in segment.reference_call.args[-1]])
    expected[V4_SEGMENTER] = v4_network(v4_network.normalize(photos)).argmax(1)
    for contender in segment.contenders:
        agreement = (masks(contender.call()) == expected[contender.model]).float().mean()
        assert agreement > (0.99 if "fp32" in contender.variant else 0.8), contender.variant


def test_outside_share_reads_the_predictors_timings():
    """The median over results of (pre-process + post-process) / total; None for a call without Predictor results."""
    timings = [Timings(1.0, 8.0, 1.0), Timings(3.0, 6.0, 1.0), Timings(0.5, 9.0, 0.5)]  # 20%, 40%, 10%
    results = [Detections(image=None, path=None, categories=[], timings=t) for t in timings]
    assert outside_share(lambda: results, repeats=1) == pytest.approx(0.2)
    assert outside_share(lambda: torch.zeros(3)) is None


def test_op_breakdown_names_the_kernels(tmp_path):
    from benchmarking.workloads import op_breakdown

    from heads.deploy import runtimes
    from heads.registry import create_model

    model = create_model("lraspp_mbv3_small_reduced").eval()
    images = torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8)
    for format in QUICK.deploy_formats:
        runtime = runtimes.load(runtimes.export(model, tmp_path / f"m{runtimes.FORMATS[format]}", size=(64, 128)))
        times = op_breakdown(runtime, images, repeats=2)
        assert all(ms >= 0 for _, ms in times) and any("Conv" in name for name, _ in times)


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: two OpenMP threads on a CPU shared with other jobs can run 100x slower
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--threads", "1",
                             "--channels-last", "--json", str(out)], capture_output=True, text=True, check=True)
    assert "### detect" in result.stdout and "| mbv3_small | eager | 96x96 | 1 |" in result.stdout
    assert "| `heads.Predictor` on PyTorch |" in result.stdout and "GFLOP/s (% of sgemm peak)" in result.stdout
    assert "| best deployed runtime, fp32 | 0." in result.stdout  # the deploy rows share the detect rows' label
    rows = json.loads(out.read_text())["rows"]
    expected = {("classify", "mbv3_large_reduced"), ("features", "mbv3_large_reduced"), ("classify", "mbv3_small"),
                ("detect", "ssdlite320_mbv3_large_reduced"), ("segment", "lraspp_mbv3_large"),
                ("train", "ssdlite320_mbv3_large_reduced"), ("train", "lraspp_mbv3_large"), ("deploy", "mbv3_large"),
                ("deploy", "ssdlite320_mbv3_large_reduced"), ("deploy", "lraspp_mbv3_large"),
                ("detect", V4_DETECTOR), ("segment", V4_SEGMENTER), ("deploy", "mbv4_conv_small"),
                ("deploy", V4_DETECTOR), ("deploy", V4_SEGMENTER)}
    assert {(r["task"], r["model"]) for r in rows} == expected
    assert {r["variant"] for r in rows} == {"eager", "channels_last", "model", "Predictor", "engine", "onnx fp32",
                                            "onnx int8", "openvino fp32", "openvino int8"}
    assert all(r["ms_median"] > 0 and r["reference_ms_median"] > 0 for r in rows)
    assert all(r["images_per_s"] > 0 for r in rows if r["task"] == "train")
    predictors = [r for r in rows if r["variant"] == "Predictor" or
                  r["task"] == "deploy" and r["model"] in (DETECTOR, SEGMENTER, V4_DETECTOR, V4_SEGMENTER)]
    assert predictors and all(0 < r["outside"] < 1 for r in predictors)
    assert not any("outside" in r for r in rows if r not in predictors)
    assert "outside the model call" in result.stdout
