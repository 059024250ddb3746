"""Sample photos that ship with the package (see README.md here for their sources)."""
from pathlib import Path

SAMPLE_IMAGES = {path.stem: path for path in sorted(Path(__file__).parent.glob("*.jpg"))}
