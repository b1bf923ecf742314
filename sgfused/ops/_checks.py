"""Input checks shared by every op: each failure names the argument, what was expected and what came.

Two kinds:

* static checks (types, ranks, shapes, scalar options) run in Python; torch.compile
  traces them as guards, so compiled and eager calls refuse the same input;
* data-dependent checks (length values, NaN / inf) run inside registered operators
  (``sgfused::checked_lengths``, ``checked_ids``, ``check_finite``; csrc/cpu/input_checks.cpp),
  the same C++ code the compiled kernels call, so they stay in compiled graphs. Their
  results must be used downstream (:func:`checked_lengths` returns the lengths to pass on,
  :func:`checked_finite` a copy of ``carry``): an operator whose output is unused can be
  dropped by the compiler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """Refuse NaN with its first position, in eager mode only (skipped while torch.compile traces).

    Prefer :func:`checked_finite`, which also holds in compiled graphs.
    """
    if torch.compiler.is_compiling():
        return
    if bool(torch.isnan(value.max())):  # max propagates NaN: one pass, no full-size mask
        first = tuple(int(i) for i in torch.isnan(value).nonzero()[0])
        raise ValueError(f"{name} contains NaN (first at index {first})")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_option(
    name: str, value: object, low: float = -FLOAT32_MAX, high: float = FLOAT32_MAX, *, low_open: bool = False
) -> float:
    """A finite real scalar option in ``[low, high]`` (``(low, high]`` if ``low_open``), as a float.

    NaN and +-inf are refused whatever the bounds; the default bounds are the float32 range,
    since the kernels compute in float32.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    inside = (number > low if low_open else number >= low) and number <= high
    if not math.isfinite(number) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def as_index_tensor(name: str, value: object, device: torch.device) -> object:
    """A list / tuple of Python ints becomes an int64 tensor on ``device``; anything else is returned as is."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be an integer tensor or a list of ints, got {value!r}")
        return torch.tensor(value, dtype=torch.long, device=device)
    return value


def checked_lengths(
    name: str, lens: Tensor | Sequence[int] | None, count: int, padded: int, device: torch.device
) -> Tensor:
    """Valid lengths as an int64 tensor: ``count`` values in ``[1, padded]``, all ``padded`` when None.

    Accepts a tensor or a list / tuple of ints. The value range is checked by the
    ``sgfused::checked_lengths`` operator, so it also holds under torch.compile; pass the
    returned tensor on.
    """
    if lens is None:
        return torch.full((count,), padded, dtype=torch.long, device=device)
    lens = as_index_tensor(name, lens, device)
    check_tensor(name, lens, 1, floating=False)
    check_size(name, lens, 0, count, "one length per set")
    return torch.ops.sgfused.checked_lengths(lens.long(), count, padded, name)


def checked_finite(name: str, value: Tensor, carry: Tensor) -> Tensor:
    """``carry`` (copied) once ``value`` is known to hold no NaN / +-inf; else ValueError naming the first index.

    Runs as the ``sgfused::check_finite`` operator, so it also holds under torch.compile:
    use the returned tensor downstream (e.g. the ids or lengths the kernel gets next).
    """
    return torch.ops.sgfused.check_finite(value.detach(), name, carry)


def _register_fakes() -> None:
    """Shapes of the check operators for torch.compile's tracing (their checks run at run time)."""
    contiguous_copy = lambda tensor: torch.empty_like(tensor, memory_format=torch.contiguous_format)  # noqa: E731
    torch.library.register_fake("sgfused::checked_lengths")(lambda lens, count, padded, name: contiguous_copy(lens))
    torch.library.register_fake("sgfused::checked_ids")(lambda ids, count, name: contiguous_copy(ids))
    torch.library.register_fake("sgfused::check_finite")(lambda values, name, carry: contiguous_copy(carry))


_register_fakes()
