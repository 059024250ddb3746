"""Demo: build every registered backbone and print its size and C1..C5 feature pyramid."""
import argparse

import timm
import torch

from . import MODELS
from .profile import count_madds, count_params


def model_table(size: int = 224, output_stride: int = 32) -> str:
    """A markdown table: params and MAdds (1000 classes), and C1..C5 channels for both tap locations."""
    rows = [f"| model | params | MAdds @{size} | C1..C5 channels (block) | C1..C5 channels (expansion) | strides | "
            "pretrained tags |", "|---|---:|---:|---|---|---|---|"]
    image = torch.zeros(1, 3, size, size)
    for entry in MODELS:
        model = timm.create_model(entry.name).eval()
        features = dict(features_only=True, output_stride=output_stride)
        block = timm.create_model(entry.name, **features).feature_info
        expansion = timm.create_model(entry.name, feature_location="expansion", **features).feature_info
        rows.append(f"| {entry.name} | {count_params(model):,} | {count_madds(model, image) / 1e6:.1f}M | "
                    f"{', '.join(map(str, block.channels()))} | {', '.join(map(str, expansion.channels()))} | "
                    f"{', '.join(map(str, block.reduction()))} | {', '.join(entry.weights) or '-'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224, help="input size for the MAdds count")
    parser.add_argument("--output-stride", type=int, default=32, choices=(8, 16, 32), help="dilate past this stride")
    args = parser.parse_args()
    print(model_table(args.size, args.output_stride))


if __name__ == "__main__":
    main()
