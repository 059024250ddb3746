"""Benchmark our backbones against torchvision / timm in one run: markdown to stdout, JSON to --json."""
import argparse
import json

import torch

from mbbackbones.benchmark import COUNTERPARTS, markdown, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", choices=sorted(COUNTERPARTS), help="default: all")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="two models, batch 1, 3 repeats, 96 px (smoke test)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.batches, args.repeats, args.size = ["mbv3_large_reduced", "mbv3_small"], [1], 3, 96
    result = run(args.models, tuple(args.batches), args.size, args.repeats)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
