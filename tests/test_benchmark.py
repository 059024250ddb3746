import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm

from mbbackbones.benchmark import COUNTERPARTS, FEATURE_ROWS
from mbbackbones.profile import count_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
def test_counterparts_are_the_same_architecture(name):
    assert count_params(COUNTERPARTS[name][1]()) == count_params(timm.create_model(name))


@pytest.mark.parametrize("name", sorted(FEATURE_ROWS))
def test_feature_rows_compare_equal_extractors(name):
    ours = timm.create_model(name, features_only=True)
    assert count_params(ours) == count_params(FEATURE_ROWS[name][1]())


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, check=True)
    assert "| classify | mbv3_small | 1 |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    expected = {("classify", "mbv3_large_reduced"), ("features", "mbv3_large_reduced"), ("classify", "mbv3_small")}
    assert {(r["task"], r["model"]) for r in rows} == expected
    assert all(r["ms_median"] > 0 and r["reference_ms_median"] > 0 for r in rows)
