"""Triton kernels of the late-interaction max-mean score ``max_sim`` (SGM Eq. 6-7, docs/max_sim_contract.md).

``S[a, b] = (1 / y_lens[b]) * sum_{t < y_lens[b]} max_{o < x_lens[a]} <y[b, t], x[a, o]>``;
ground truth: sgfused/reference/max_sim.py. The two launchers at the bottom are wrapped as
``torch.library.custom_op`` by sgfused.ops.max_sim.

Rows: a program owns ``CAPS`` whole captions, i.e. the ``CAPS * Ly`` consecutive rows
``b0 * Ly + r`` of ``y`` seen as a ``(Ny * Ly, d)`` matrix (``BLOCK_R``, a power of two, rows
with ``r < CAPS * Ly`` in use), so row ``r`` is caption ``b0 + r // Ly``, node ``r % Ly``.

Kernels:

* ``_forward_kernel``: one program per (image ``a``, caption block). Tiles of ``BLOCK_O`` image
  nodes: ``tl.dot`` over ``d`` in chunks of ``BLOCK_D`` gives the (rows, nodes) dot products, the
  padded nodes are set to -inf, a running max / argmax runs over the tiles (lowest index on ties:
  the lowest node of a tile, and a later tile only wins when strictly larger). The maxima of the
  valid rows are summed per caption by a one-hot reduction and divided by its length.
* ``_grad_y_kernel``: one program per (caption block, ``d`` chunk), looping over the images a:
  ``grad_y[rows] += w[a, rows] * (onehot(indices[a, rows]) @ x[a])``.
* ``_grad_x_kernel``: one program per (image, node tile, ``d`` chunk), looping over the caption
  blocks: ``grad_x[a, nodes] += (onehot(nodes == indices[a, rows]) * w[a, rows]) @ y[rows]``.

Both backward kernels are small GEMMs with one-hot weight matrices built on chip; every output
element is owned by one program and summed in a fixed order: no atomics, deterministic.

Padding never leaks: every load of a padded node (image ``o >= x_lens[a]``, caption
``t >= y_lens[b]``) is masked to 0 before any product, and padded nodes get zero gradient.

Precision: all accumulation in fp32 (fp64 for fp64 input). On CUDA, fp16 / bf16 products run
natively on the tensor cores; the one-hot matrix is exact in those dtypes, and where weights
enter a product (grad_x) they are split into a high and a low part in the input dtype, so the
weights keep about twice the input's mantissa. fp32 products use TF32 only when the user allows
it for torch.matmul (``torch.set_float32_matmul_precision("high")``; ``_common.dot_precision``),
else full fp32;
fp64 runs in fp64. The interpreter (no GPU) computes every product on fp32 (fp64) operands.

Block sizes: a heuristic from the shapes (``_Layout``), every one a constexpr parameter, so an
autotune list can replace it once it is measured on a GPU (none was available when written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, cast_rounded, dot_precision, native_dot, tl_dtype, widened

BLOCK_R = 64  # caption-node rows per program (forward, grad_y) and per step of grad_x
MAX_BLOCK_O = 64  # image nodes per tile
# The embedding chunks of 16-bit inputs; fp32 / fp64 tiles take twice the registers, so their chunks are
# half as wide. At SGM's sizes these compile for sm_90 without spilling (bench/triton_sm90_resources.py;
# 128 gradient columns of fp32 ran out of registers).
MAX_BLOCK_D = 64  # embedding chunk of one tl.dot (forward)
MAX_BLOCK_DO = 64  # embedding columns of the gradient per program


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _caption_rows(b0, y_lens_ptr, NY, LY, CAPS: tl.constexpr, BLOCK_R: tl.constexpr):
    """For the rows of a caption block starting at caption ``b0``: (local caption, caption, in block, valid)."""
    r = tl.arange(0, BLOCK_R)
    local = r // LY
    b = b0 + local
    in_block = (local < CAPS) & (b < NY)
    y_len = tl.load(y_lens_ptr + b, mask=in_block, other=0)
    valid = in_block & ((r % LY) < y_len)
    return local, b, in_block, valid


@triton.jit
def _row_weights(grad_ptr, y_lens_ptr, a, b, valid, NY, ACC: tl.constexpr):
    """``w[a, b] = grad[a, b] / y_lens[b]`` per row (0 at padded rows)."""
    g = tl.load(grad_ptr + a * NY + b, mask=valid, other=0.0).to(ACC)
    y_len = tl.load(y_lens_ptr + b, mask=valid, other=1).to(ACC)
    return tl.where(valid, g / y_len, 0.0)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(x_ptr, y_ptr, x_lens_ptr, y_lens_ptr, scores_ptr, idx_ptr,
                    NY, LX, LY, D, n_cap_blocks,
                    ACC: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, WITH_INDICES: tl.constexpr,
                    CAPS: tl.constexpr, BLOCK_CAPS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    a = (pid // n_cap_blocks).to(tl.int64)
    b0 = (pid % n_cap_blocks).to(tl.int64) * CAPS
    local, b, in_block, valid = _caption_rows(b0, y_lens_ptr, NY, LY, CAPS, BLOCK_R)
    rows = (b0 * LY + tl.arange(0, BLOCK_R)).to(tl.int64)
    x_len = tl.load(x_lens_ptr + a).to(tl.int32)
    best = tl.full((BLOCK_R,), float("-inf"), ACC)
    best_idx = tl.zeros((BLOCK_R,), tl.int64)  # x_len >= 1: node 0 is valid
    for o0 in range(0, x_len, BLOCK_O):
        nodes = o0 + tl.arange(0, BLOCK_O)
        node_valid = nodes < x_len
        s = tl.zeros((BLOCK_R, BLOCK_O), ACC)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            yt = widened(tl.load(y_ptr + rows[:, None] * D + ks[None, :], mask=valid[:, None] & kmask[None, :],
                                 other=0.0), ACC, NATIVE_DOT)
            xt = widened(tl.load(x_ptr + (a * LX + nodes[None, :]) * D + ks[:, None],
                                 mask=kmask[:, None] & node_valid[None, :], other=0.0), ACC, NATIVE_DOT)
            s = tl.dot(yt, xt, s, input_precision=PRECISION, out_dtype=ACC)
        s = tl.where(node_valid[None, :], s, float("-inf"))
        tile_max = tl.max(s, axis=1)
        tile_idx = tl.min(tl.where(s == tile_max[:, None], nodes[None, :], LX), axis=1)
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)
        best = tl.where(better, tile_max, best)
    per_row = tl.where(valid, best, 0.0)
    caps = tl.arange(0, BLOCK_CAPS)
    totals = tl.sum(tl.where(local[:, None] == caps[None, :], per_row[:, None], 0.0), axis=0)
    cap_in_block = (caps < CAPS) & (b0 + caps < NY)
    y_len = tl.load(y_lens_ptr + b0 + caps, mask=cap_in_block, other=1).to(ACC)
    tl.store(scores_ptr + a * NY + b0 + caps, totals / y_len, mask=cap_in_block)
    if WITH_INDICES:
        tl.store(idx_ptr + a * NY * LY + rows, tl.where(valid, best_idx, -1), mask=in_block)


@triton.jit
def _grad_y_kernel(grad_ptr, x_ptr, x_lens_ptr, y_lens_ptr, idx_ptr, out_ptr,
                   NX, NY, LX, LY, D,
                   ACC: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                   CAPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_DO: tl.constexpr):
    b0 = tl.program_id(0).to(tl.int64) * CAPS
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    local, b, in_block, valid = _caption_rows(b0, y_lens_ptr, NY, LY, CAPS, BLOCK_R)
    rows = (b0 * LY + tl.arange(0, BLOCK_R)).to(tl.int64)
    out = tl.zeros((BLOCK_R, BLOCK_DO), ACC)
    x_set, idx_set = x_ptr, idx_ptr  # image a's nodes and its (Ny, Ly) indices, advanced per image
    for a in range(0, NX):
        w = _row_weights(grad_ptr, y_lens_ptr, a, b, valid, NY, ACC)
        idx = tl.load(idx_set + rows, mask=valid, other=-1)
        x_len = tl.load(x_lens_ptr + a).to(tl.int32)
        for o0 in range(0, x_len, BLOCK_O):
            nodes = o0 + tl.arange(0, BLOCK_O)
            node_valid = nodes < x_len
            xt = widened(tl.load(x_set + nodes[:, None] * D + dcols[None, :],
                                 mask=node_valid[:, None] & dmask[None, :], other=0.0), ACC, NATIVE_DOT)
            onehot = (idx[:, None] == nodes[None, :]).to(xt.dtype)  # exact in every dtype
            picked = tl.dot(onehot, xt, input_precision=PRECISION, out_dtype=ACC)  # x[a, idx[r]] per row
            out += w[:, None] * picked
        x_set += LX * D
        idx_set += NY * LY
    ptrs = out_ptr + rows[:, None] * D + dcols[None, :]
    tl.store(ptrs, cast_rounded(out, out_ptr.dtype.element_ty), mask=in_block[:, None] & dmask[None, :])


@triton.jit
def _grad_x_kernel(grad_ptr, y_ptr, x_lens_ptr, y_lens_ptr, idx_ptr, out_ptr,
                   NY, LX, LY, D, n_node_tiles, n_cap_blocks,
                   ACC: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                   CAPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid = tl.program_id(0)
    a = (pid // n_node_tiles).to(tl.int64)
    nodes = (pid % n_node_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    x_len = tl.load(x_lens_ptr + a).to(tl.int32)
    node_valid = nodes < x_len
    out = tl.zeros((BLOCK_O, BLOCK_DO), ACC)
    for cb in range(0, n_cap_blocks):
        b0 = cb * CAPS
        local, b, in_block, valid = _caption_rows(b0, y_lens_ptr, NY, LY, CAPS, BLOCK_R)
        rows = (b0 * LY + tl.arange(0, BLOCK_R)).to(tl.int64)
        w = _row_weights(grad_ptr, y_lens_ptr, a, b, valid, NY, ACC)
        idx = tl.load(idx_ptr + a * NY * LY + rows, mask=valid, other=-1)
        yt = tl.load(y_ptr + rows[:, None] * D + dcols[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        q = tl.where(node_valid[:, None] & (nodes[:, None] == idx[None, :]), w[None, :], 0.0)  # (nodes, rows)
        if not NATIVE_DOT:
            out = tl.dot(q, yt.to(ACC), out, input_precision=PRECISION, out_dtype=ACC)
        else:
            # fp16 / bf16 tensor cores: the weights as a high and a low part in the input dtype
            q_hi = q.to(yt.dtype)
            q_lo = (q - q_hi.to(ACC)).to(yt.dtype)
            out = tl.dot(q_hi, yt, out, input_precision=PRECISION, out_dtype=ACC)
            out = tl.dot(q_lo, yt, out, input_precision=PRECISION, out_dtype=ACC)
    ptrs = out_ptr + (a * LX + nodes[:, None]) * D + dcols[None, :]
    tl.store(ptrs, cast_rounded(out, out_ptr.dtype.element_ty), mask=(nodes < LX)[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------- launch helpers
class _Layout:
    """Block sizes and dtype choices of one call (``CAPS`` whole captions of ``Ly`` rows per block)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        (self.nx, self.lx, self.d), (self.ny, self.ly, _) = x.shape, y.shape
        self.block_r = max(BLOCK_R, triton.next_power_of_2(self.ly))
        self.caps = self.block_r // self.ly
        self.block_caps = max(2, triton.next_power_of_2(self.caps))
        self.n_cap_blocks = triton.cdiv(self.ny, self.caps)
        self.block_o = max(16, min(MAX_BLOCK_O, triton.next_power_of_2(self.lx)))
        self.n_node_tiles = triton.cdiv(self.lx, self.block_o)
        halved = 2 if x.element_size() > 2 else 1
        self.block_d = max(16, min(MAX_BLOCK_D // halved, triton.next_power_of_2(max(self.d, 1))))
        self.block_do = max(16, min(MAX_BLOCK_DO // halved, triton.next_power_of_2(max(self.d, 1))))
        self.n_d_chunks = triton.cdiv(self.d, self.block_do)
        self.acc = acc_dtype(x.dtype)
        self.native_dot = native_dot(x.dtype, x.device)
        self.precision = dot_precision(x.dtype)

    @property
    def constants(self) -> dict:
        return dict(
            ACC=tl_dtype(self.acc),
            NATIVE_DOT=self.native_dot, PRECISION=self.precision, CAPS=self.caps, BLOCK_R=self.block_r,
            BLOCK_O=self.block_o,
        )


def _check_indices(indices: Tensor, x_lens: Tensor, y_lens: Tensor, p: _Layout) -> None:
    """The backward gathers through ``indices``: every valid caption node must name a valid image node."""
    if indices.dtype != torch.int64 or indices.shape != (p.nx, p.ny, p.ly):
        raise ValueError(
            f"indices must be int64 of shape {(p.nx, p.ny, p.ly)} (call the forward with with_indices=True), "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    valid = torch.arange(p.ly, device=y_lens.device) < y_lens[:, None]  # (Ny, Ly)
    bad = valid[None] & ((indices < 0) | (indices >= x_lens[:, None, None]))
    if bool(bad.any()):
        raise ValueError(
            "indices must name a valid image node (0 <= index < x_lens) at every valid caption node; "
            "pass the indices the forward returned"
        )


# ----------------------------------------------------------------------------- launchers
def forward(x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor, with_indices: bool) -> tuple[Tensor, Tensor]:
    """Scores (Nx, Ny) in the accumulation dtype and, with ``with_indices``, the argmax nodes
    (Nx, Ny, Ly) int64 (-1 at padded caption nodes); else an empty (0,) int64 tensor."""
    x, y, x_lens, y_lens = x.contiguous(), y.contiguous(), x_lens.contiguous(), y_lens.contiguous()
    p = _Layout(x, y)
    scores = torch.empty((p.nx, p.ny), dtype=p.acc, device=x.device)
    shape = (p.nx, p.ny, p.ly) if with_indices else (0,)
    indices = torch.empty(shape, dtype=torch.int64, device=x.device)
    if scores.numel() == 0:
        return scores, indices
    _forward_kernel[(p.nx * p.n_cap_blocks,)](
        x, y, x_lens, y_lens, scores, indices, p.ny, p.lx, p.ly, p.d, p.n_cap_blocks,
        WITH_INDICES=bool(with_indices), BLOCK_CAPS=p.block_caps, BLOCK_D=p.block_d, **p.constants,
    )
    return scores, indices


def backward(
    grad: Tensor, x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor, indices: Tensor
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_y) of ``sum(grad * scores)`` in the dtypes of x and y, the subgradient at ``indices``
    (the forward's argmax); padded nodes get 0."""
    x, y, x_lens, y_lens = x.contiguous(), y.contiguous(), x_lens.contiguous(), y_lens.contiguous()
    p = _Layout(x, y)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if p.nx == 0 or p.ny == 0 or p.d == 0:
        return grad_x.zero_(), grad_y.zero_()
    _check_indices(indices, x_lens, y_lens, p)
    g = grad.to(p.acc).contiguous()
    indices = indices.contiguous()
    _grad_y_kernel[(p.n_cap_blocks, p.n_d_chunks)](
        g, x, x_lens, y_lens, indices, grad_y, p.nx, p.ny, p.lx, p.ly, p.d,
        BLOCK_DO=p.block_do, **p.constants,
    )
    _grad_x_kernel[(p.nx * p.n_node_tiles, p.n_d_chunks)](
        g, y, x_lens, y_lens, indices, grad_x, p.ny, p.lx, p.ly, p.d, p.n_node_tiles, p.n_cap_blocks,
        BLOCK_DO=p.block_do, **p.constants,
    )
    return grad_x, grad_y
