"""Train LR-ASPP: ``python tools/train_seg.py --config configs/lraspp_mbv3_large_cityscapes.yaml [--key value]``.

Multi-process: ``torchrun --nproc_per_node N tools/train_seg.py --config ...``.
"""
import sys

from heads.cli import train_main

if __name__ == "__main__":
    train_main(sys.argv[1:], task="segmentation")
