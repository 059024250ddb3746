"""The data-pipeline benchmark reads and augments what its rows name, and its quick mode runs."""
import json

import torch
from benchmarking.pipeline import QUICK, main, pipeline_rows


def test_rows_do_the_work_they_name(tmp_path):
    rows = {(row.dataset.split(",")[0], row.pipeline): row.data for row in pipeline_rows(QUICK, tmp_path)}
    assert list(rows) == [("built-in COCO", "read"), ("built-in COCO", "ssd -> 320x320"),
                          ("built-in COCO", "ssdlite -> 320x320"), ("built-in Cityscapes", "read"),
                          ("built-in Cityscapes", "SegTrainTransform -> 64x32 crops")]
    assert all(len(data) == QUICK.images for data in rows.values())
    low, high = QUICK.coco_sides
    image, _ = rows["built-in COCO", "read"][0]
    assert low <= min(image.shape[1:]) and max(image.shape[1:]) <= high
    ssd, ssdlite = rows["built-in COCO", "ssd -> 320x320"], rows["built-in COCO", "ssdlite -> 320x320"]
    assert ssd.transform.augment.transforms[0].__class__.__name__ == "RandomPhotometricDistort"
    assert [type(op).__name__ for op in ssdlite.transform.augment.transforms] == ["RandomIoUCrop", "HorizontalFlip"]
    assert ssd[(0, 1)][0].shape == ssdlite[(0, 1)][0].shape == (3, 320, 320)
    assert rows["built-in Cityscapes", "read"][0][0].shape == (3, *QUICK.cityscapes_size)
    image, mask = rows["built-in Cityscapes", "SegTrainTransform -> 64x32 crops"][(0, 1)]
    assert image.shape == (3, *QUICK.crop_size) and mask.shape == QUICK.crop_size


def test_quick_mode_measures_every_row(tmp_path, capsys):
    threads = torch.get_num_threads()
    main(["--quick", "--data-root", str(tmp_path), "--json", str(tmp_path / "pipeline.json")])
    assert torch.get_num_threads() == threads  # one thread while measuring only
    rows = json.loads((tmp_path / "pipeline.json").read_text())["rows"]
    assert len(rows) == 5 and all(row["images_per_s"] > 0 and row["ms_per_image"] > 0 for row in rows)
    table = capsys.readouterr().out
    assert "one process, 1 thread" in table and "| ssdlite -> 320x320 |" in table
