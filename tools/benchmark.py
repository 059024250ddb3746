"""Benchmark our models against torchvision / timm in one run: a markdown table per task, JSON to --json."""
import argparse
import json
from pathlib import Path

import torch
from benchmarking.harness import COUNTERPARTS, markdown, run
from benchmarking.workloads import FULL, QUICK, TASKS, targets_table, workloads

from heads.assets import SAMPLE_IMAGES
from heads.data import read_image

# real photos: inputs of the SSDLite rows, their BatchNorm calibration, INT8 calibration
IMAGES = list(SAMPLE_IMAGES.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--models", nargs="+", choices=sorted(COUNTERPARTS),
                        help=f"classify rows, eager and deployed (default: all; {FULL.deploy_classifiers} deployed)")
    parser.add_argument("--formats", nargs="+", choices=FULL.deploy_formats,
                        help="deployment runtimes timed (default: all installed)")
    parser.add_argument("--batches", nargs="+", type=int, help=f"classify, features, detect (default: {FULL.batches})")
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default: {FULL.repeats})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="also time channels-last copies of the backbones")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd backbones and predictors (slow start)")
    parser.add_argument("--images", nargs="+", default=IMAGES, help="photos for the SSDLite rows")
    parser.add_argument("--quick", action="store_true", help="few rows, tiny sizes, 3 repeats (smoke test)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    overrides = dict(classify_models=args.models and tuple(args.models), batches=args.batches and tuple(args.batches),
                     repeats=args.repeats, deploy_classifiers=args.models and tuple(args.models),
                     deploy_formats=args.formats and tuple(args.formats))
    settings = settings._replace(**{key: value for key, value in overrides.items() if value})
    images = [read_image(path) for path in args.images]
    extra = [name for name, wanted in (("channels_last", args.channels_last), ("compiled", args.compile)) if wanted]
    result = run(workloads(args.tasks, settings, images, extra), settings.repeats, settings.budget_s)
    print(targets_table(result), markdown(result), sep="\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
