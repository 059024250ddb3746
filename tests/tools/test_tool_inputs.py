"""Inputs the tools refuse, each with one line and exit status 2: results files they cannot score, and output paths
they cannot write (checked before any work)."""
import json

import pytest
from conftest import write_coco
from PIL import Image

from heads.cli import eval_det_main, eval_seg_main, export_main, infer_main


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco", {"a.jpg": Image.new("RGB", (64, 48))}, [("a.jpg", [1, 2, 30, 20], 0)])


def one_line_error(main, argv: list[str], capsys) -> str:
    """The error ``main(argv)`` ends with, after checking that it is one line with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    return error.removeprefix("error: ").rstrip("\n")


GOOD = {"image_id": 1, "category_id": 5, "bbox": [1, 2, 30, 20], "score": 0.9}


def test_a_good_results_file_scores(coco, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([GOOD]))
    metrics = eval_det_main(["--results", str(tmp_path / "results.json"), "--data-root", str(coco)])
    assert metrics.stats["AP"] == pytest.approx(1)


@pytest.mark.parametrize("change, problem", [
    ({"score": float("nan")}, "entry 1: score nan is not a finite number"),
    ({"bbox": [1, 2, float("inf"), 20]}, "entry 1: bbox [1, 2, inf, 20] is not [x, y, w, h] of finite numbers"),
    ({"bbox": [1, 2, -30, 20]}, "entry 1: bbox [1, 2, -30, 20] is not [x, y, w, h] of finite numbers"),
    ({"image_id": "1"}, "entry 1: image_id '1' is not an integer"),
    ({"image_id": 1.0}, "entry 1: image_id 1.0 is not an integer"),
    ({"category_id": 5.5}, "entry 1: category_id 5.5 is not an integer"),
    ({"bbox": None}, "entry 1: bbox None is not [x, y, w, h]"),
])
def test_a_results_file_with_a_bad_entry_is_one_line(coco, tmp_path, capsys, change, problem):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([GOOD, {**GOOD, **change}]))  # Python's json writes NaN and Infinity
    error = one_line_error(eval_det_main, ["--results", str(path), "--data-root", str(coco)], capsys)
    assert error.startswith(f"{path}: {problem}")


@pytest.mark.parametrize("content, problem", [
    ("[{", "malformed JSON"),
    ('{"image_id": 1}', "expected a JSON list of results, got dict"),
    ('[{"image_id": 1}]', "entry 0 is not a dict with image_id, category_id, bbox, score"),
])
def test_a_results_file_that_is_no_results_list_is_one_line(coco, tmp_path, capsys, content, problem):
    (tmp_path / "results.json").write_text(content)
    error = one_line_error(eval_det_main, ["--results", str(tmp_path / "results.json"), "--data-root", str(coco)],
                           capsys)
    assert error.startswith(f"{tmp_path / 'results.json'}: {problem}")


def test_results_for_images_or_categories_it_does_not_have_are_one_line(coco, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps([{**GOOD, "image_id": 99}]))
    error = one_line_error(eval_det_main, ["--results", str(tmp_path / "results.json"), "--data-root", str(coco)],
                           capsys)
    assert error == "results refer to image ids not in the ground truth: [99]"


@pytest.fixture
def paths(tmp_path) -> dict:
    """Names for the argument lists below: a folder, a file in it, and inputs that do not exist (a tool that
    read them before checking its outputs would fail on those instead)."""
    (tmp_path / "file.txt").write_text("taken")
    return dict(folder=tmp_path, file=tmp_path / "file.txt", nowhere=tmp_path / "nowhere")


@pytest.mark.parametrize("main, argv, message", [
    (eval_det_main, ["--results", "{nowhere}.json", "--data-root", "{nowhere}", "--json", "{folder}"],
     "--json {folder} is a folder; give the file to write"),
    (eval_det_main, ["--weights", "{nowhere}.pt", "--data-root", "{nowhere}", "--out", "{file}"],
     "--out {file} is a file; give a folder (made if missing)"),
    (eval_det_main, ["--weights", "{nowhere}.pt", "--builtin", "--json", "{file}/metrics.json"],
     "--json {file}/metrics.json: cannot write into {file}: a file is in the way"),
    (eval_seg_main, ["--predictions", "{nowhere}", "--data-root", "{nowhere}", "--out", "{file}"],
     "--out {file} is a file; give a folder (made if missing)"),
    (infer_main, ["--weights", "{nowhere}.pt", "{nowhere}.jpg", "--out", "{file}"],
     "--out {file} is a file; give a folder (made if missing)"),
    (export_main, ["--weights", "{nowhere}.pt", "--out", "{folder}"], "--out {folder} is a folder; give the file"),
    (export_main, ["--weights", "{nowhere}.pt", "--out", "{folder}/m.onnx", "--size", "0"],
     "argument --size: must be at least 1, got 0"),
    (export_main, ["--weights", "{nowhere}.pt", "--out", "{folder}/m.onnx", "--size", "320", "-320"],
     "argument --size: must be at least 1, got -320"),
])
def test_outputs_it_cannot_write_are_one_line_before_any_work(main, argv, message, paths, capsys):
    argv = [arg.format(**paths) for arg in argv]
    assert one_line_error(main, argv, capsys).startswith(message.format(**paths))


def test_a_read_only_output_folder_is_one_line_before_any_work(paths, monkeypatch, capsys):
    """Simulated (root, which runs these tests in CI containers, may write into any folder): the folder refuses
    new files."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    error = one_line_error(infer_main, ["--weights", f"{paths['nowhere']}.pt", f"{paths['nowhere']}.jpg", "--out",
                                        str(paths["folder"] / "pictures")], capsys)
    assert error == f"--out {paths['folder'] / 'pictures'}: cannot write into {paths['folder'] / 'pictures'}: " \
                    "Permission denied"
