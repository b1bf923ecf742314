"""Input checks shared by every op: each failure names the argument, what was expected and what came."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, ndim: int, floating: bool = True) -> Tensor:
    """``value`` must be a tensor of rank ``ndim``, floating (fp16/bf16/fp32/fp64) or integer."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if not floating and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def check_size(name: str, value: Tensor, dim: int, expected: int, what: str) -> None:
    """``value.shape[dim]`` must equal ``expected`` (``what`` says where that number comes from)."""
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name} must have size {expected} in dim {dim} ({what}), got shape {tuple(value.shape)}"
        )


def check_nonempty(name: str, value: Tensor) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    """All given tensors live on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_no_nan(name: str, value: Tensor) -> None:
    """Refuse NaN with its first position (skipped while torch.compile traces, where it cannot sync)."""
    if torch.compiler.is_compiling():
        return
    if bool(torch.isnan(value.max())):  # max propagates NaN: one pass, no full-size mask
        first = tuple(int(i) for i in torch.isnan(value).nonzero()[0])
        raise ValueError(f"{name} contains NaN (first at index {first})")
