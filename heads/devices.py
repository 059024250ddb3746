"""The one device resolver: what ``"auto"``, ``"cpu"``, ``"cuda:N"`` mean on this machine."""
from __future__ import annotations

import torch

from mbbackbones.choices import ArgumentError


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (``local_rank`` under torchrun) when there is one, else the CPU. A CUDA device
    on a machine without one is a one-line :class:`ArgumentError`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"device: {device}, but this machine has no usable CUDA GPU (no NVIDIA driver, or a CPU "
                            "build of torch); use device: cpu (or auto)")
    return torch.device(device)
