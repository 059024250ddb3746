"""Predict and draw: ``python tools/infer.py --weights runs/detection images/ clip.mp4 --out pictures`` (images,
videos, a camera index); see --help."""
from heads.cli import infer_main

if __name__ == "__main__":
    infer_main()
