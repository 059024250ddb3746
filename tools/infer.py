"""Predict and draw: ``python tools/infer.py --weights runs/detection images/ --out pictures``; see --help."""
from heads.cli import infer_main

if __name__ == "__main__":
    infer_main()
