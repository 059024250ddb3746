"""Parameter and multiply-add counts."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_madds(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward (convolutions and matmuls, as torch's flop counter sees them)."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2
