"""Train SSDLite: ``python tools/train_det.py --config configs/ssdlite320_mbv3_large_reduced_coco.yaml [--key value]``.

Multi-process: ``torchrun --nproc_per_node N tools/train_det.py --config ...``.
"""
import sys

from heads.cli import train_main

if __name__ == "__main__":
    train_main(sys.argv[1:], task="detection")
