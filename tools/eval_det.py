"""Evaluate a detector: ``python tools/eval_det.py --weights runs/detection --builtin [--out DIR]``; see --help."""
from heads.cli import eval_det_main

if __name__ == "__main__":
    eval_det_main()
