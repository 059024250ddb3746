"""Evaluate a segmenter: ``python tools/eval_seg.py --weights runs/segmentation --builtin [--out DIR]``; see --help."""
from heads.cli import eval_seg_main

if __name__ == "__main__":
    eval_seg_main()
