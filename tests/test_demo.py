import subprocess
import sys

import mbbackbones


def test_demo_prints_every_model():
    result = subprocess.run([sys.executable, "-m", "mbbackbones", "--output-stride", "16"], capture_output=True,
                            text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| model | params | MAdds @224")
    for name in mbbackbones.list_models():
        assert any(line.startswith(f"| {name} |") for line in lines)
    assert "| mbv3_large | 5,483,032 | 216.6M | 16, 24, 40, 112, 960 | 64, 72, 240, 672, 960 | 2, 4, 8, 16, 16 |" in (
        result.stdout)
