"""Triton kernels for all-pairs vector similarity (docs/pairwise_similarity_contract.md).

Semantics: docs/pairwise_similarity_contract.md; ground truth: sgfused/reference/pairwise_similarity.py.
The two launchers at the bottom are wrapped as ``torch.library.custom_op`` by sgfused.ops.

A "pair" p is (i, j) = (p // Ny, p % Ny) for all pairs, (p, p) when aligned. Its feature vector
``e_p`` is ``(a_i - b_j)^2`` (distance: a, b = x, y as stored) or ``a_i * b_j`` (direction: a, b =
l2norm(x), l2norm(y), which the launcher computes once in the accumulation dtype, O((Nx + Ny) d)).
``e`` tiles are built from the a and b rows in registers, one d-chunk at a time, and fed to
``tl.dot``; the (Nx, Ny, d) tensor is never stored, not even one block of it.

Kernels:

* ``_pairs_kernel``: one program per block of BLOCK_P pairs holding all m outputs of each pair
  (BLOCK_M = next power of two >= m): z = e @ W^T + b over d-chunks, then the l2norm epilogue.
  Forward: writes out and norm. GRAD: writes ``dz = g / r - z (z . g) / (r^2 ||z||)`` (second term 0
  when ||z|| = 0) into a (P, m) buffer in the accumulation dtype (the size of grad_out). z comes back
  as out * (norm + eps) for fp32 / fp64 outputs (no product, as the CUDA kernels do); fp16 / bf16
  outputs were rounded, so there z is recomputed (exact, once, not once per gradient).
* ``_grad_ends_kernel``: both row gradients from one product per pair, ``dE = dz @ W_chunk``, which
  gives the row r ``2 (a_r - b_c) dE`` (distance) or ``dE * b_c`` (direction) and its partner c
  ``-2 (a_r - b_c) dE`` or ``dE * a_r``. All pairs: the larger of x, y is the rows (BLOCK_P per
  program, the product's M side), the other their partners, stepped through one at a time over a
  contiguous split, in order; the row sums stay in registers over the split and go to a
  (split, rows, d) partial, each partner's sum over the row block to a (row blocks, partners, d)
  partial; the launcher sums both (torch, deterministic). Aligned: one program per block of rows,
  each row its own single pair, both gradients written directly.
* ``_grad_weight_kernel``: one program per (m-block, d-chunk, split): ``sum_p outer(dz_p, e_p)`` over a
  contiguous range of pairs, in order, into a (split, m, d) partial; the launcher sums the splits
  (torch, deterministic). grad_bias is the (deterministic) torch sum of dz over pairs.

Products with W per pair, fwd+bwd: three for fp32 / fp64 (z, dE, grad_weight), as the reference
does; four for fp16 / bf16 (z recomputed).

Direction mode: ``_grad_ends_kernel`` gives the gradients of l2norm(x) / l2norm(y); the launcher takes
them through l2norm per row with torch (O((Nx + Ny) d)); a zero row (||v|| = 0) gets du / eps, the
second term dropped as for dz (the reference's autograd gives NaN there).

Extra memory: the dz buffer (P, m), the (split, m, d) grad_weight partials, the row-gradient
partials ((split + row blocks) x (Nx + Ny) x d at most) and O((Nx + Ny) d) for l2norm(x),
l2norm(y) (direction).

Stores to bf16 go through ``cast_rounded``, which rounds to nearest even by hand: the interpreter's
fp32 -> bf16 conversion truncates, the GPU's rounds; this gives the same bits on both.

Element-wise arithmetic is in the accumulation dtype (fp32, fp64 for fp64 input). Every tl.dot
accumulates in it too; its operands (``e``, W, dz) are rounded to the input dtype first
(``_common.dot_operand``), as the CPU kernels' fp16 / bf16 GEMMs round them, so 16-bit inputs run
on the tensor cores; fp32 runs in full precision, or TF32 when the user allows it
(``_common.dot_precision``). fp16 distance is the exception: ``e = (x - y)^2`` exceeds fp16's range
(65504) from ``|x - y| = 256``, so there the operands stay fp32 and the products run as TF32 (fp16's
10 mantissa bits, fp32's range; in the interpreter, full fp32); no
atomics, every output element is written by one program in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (acc_dtype, cast_rounded, dot_operand, dot_precision, keeps_fp32_operands, native_dot,
                      split_count, sum_partials, tl_dtype)

BLOCK_K = 32  # d-chunk of one tl.dot (halved for 4- and 8-byte inputs)
BLOCK_KW = 64  # d columns of grad_weight per program (halved for 4- and 8-byte inputs)
BLOCK_KE = 64  # d columns of the row gradients per program (halved for 4- and 8-byte inputs)
BLOCK_MW = 64  # m rows of grad_weight per program
BLOCK_PW = 32  # pairs per step of the grad_weight loop
TARGET_PROGRAMS_CUDA = 512  # the backward kernels split their loops until about this many programs run
TARGET_PROGRAMS_CPU = 2  # (the interpreter: few, but enough that the tests take more than one split)


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _pair_index(p, Ny, ALIGNED: tl.constexpr):
    """(i, j) of pairs p, as int64."""
    p = p.to(tl.int64)
    if ALIGNED:
        i = p
        j = p
    else:
        i = p // Ny
        j = p % Ny
    return i, j


@triton.jit
def _e_tile(a_ptr, b_ptr, i, j, pmask, ks, kmask, D, ACC: tl.constexpr, DISTANCE: tl.constexpr):
    """e[i[p], j[p], ks] for every pair p: (BLOCK_P, BLOCK_K) in ACC, 0 where masked."""
    msk = pmask[:, None] & kmask[None, :]
    a = tl.load(a_ptr + i[:, None] * D + ks[None, :], mask=msk, other=0.0).to(ACC)
    b = tl.load(b_ptr + j[:, None] * D + ks[None, :], mask=msk, other=0.0).to(ACC)
    if DISTANCE:
        diff = a - b
        e = diff * diff
    else:
        e = a * b
    return e


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _pairs_kernel(a_ptr, b_ptr, w_ptr, bias_ptr, eps_ptr, g_ptr, saved_ptr, out_ptr, norm_ptr,
                  P, Ny, D, M,
                  ACC: tl.constexpr, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, DISTANCE: tl.constexpr, ALIGNED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, GRAD: tl.constexpr, RECOVER: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """z of BLOCK_P pairs (all m); forward: out = z / (||z|| + eps), norm = ||z||; GRAD: out = dz.

    RECOVER (GRAD with fp32 / fp64 outputs): z = saved * (norm + eps) from the forward's output and
    norm, no product; otherwise z is recomputed from e and W.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    pm = p.to(tl.int64)[:, None] * M + ms[None, :]
    msk = pmask[:, None] & mmask[None, :]
    eps = tl.load(eps_ptr)
    if RECOVER:
        nrm = tl.load(norm_ptr + p, mask=pmask, other=0.0).to(ACC)
        z = tl.load(saved_ptr + pm, mask=msk, other=0.0).to(ACC) * (nrm + eps)[:, None]
    else:
        i, j = _pair_index(p, Ny, ALIGNED)
        z = tl.zeros((BLOCK_P, BLOCK_M), ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            e = dot_operand(_e_tile(a_ptr, b_ptr, i, j, pmask, ks, kmask, D, ACC, DISTANCE), DOT, NATIVE_DOT)
            wt = tl.load(w_ptr + ms[None, :] * D + ks[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
            z = tl.dot(e, dot_operand(wt, DOT, NATIVE_DOT), z, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            z += tl.load(bias_ptr + ms, mask=mmask, other=0.0).to(ACC)[None, :]
        nrm = tl.sqrt(tl.sum(z * z, axis=1))
    r = nrm + eps
    if GRAD:
        g = tl.load(g_ptr + pm, mask=msk, other=0.0).to(ACC)
        zg = tl.sum(z * g, axis=1)
        coef = tl.where(nrm > 0, zg / (r * r) / tl.where(nrm > 0, nrm, 1.0), 0.0)
        dz = g / r[:, None] - z * coef[:, None]
        tl.store(out_ptr + pm, dz.to(out_ptr.dtype.element_ty), mask=msk)
    else:
        tl.store(out_ptr + pm, cast_rounded(z / r[:, None], out_ptr.dtype.element_ty), mask=msk)
        tl.store(norm_ptr + p, nrm.to(norm_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _grad_ends_kernel(a_ptr, b_ptr, w_ptr, dz_ptr, ga_ptr, gb_ptr, R, C, D, M, s_r, s_c, cols_per_split,
                      ACC: tl.constexpr, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, DISTANCE: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both ends' gradients from one product per pair: dE_rc = W^T dz_rc onto a row r and its partner c.

    The row gets dE * 2 (a_r - b_c) (distance) or dE * b_c (direction), the partner -dE * 2 (a_r - b_c)
    or dE * a_r. dz of pair (r, c) is at dz_ptr + r * s_r + c * s_c (m contiguous values).
    Aligned: c = r, dz at r * M; ga[r] and gb[r] are written as they are.
    All pairs: program (row block, column split s, d-chunk) steps through the split's partners c in
    order; ga[s, r] holds row r's sum over them, gb[row block, c] partner c's sum over the block's
    rows (partials in ACC, which the launcher sums in a fixed order).
    """
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < D
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    w = tl.load(w_ptr + ms[:, None] * D + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
    w = dot_operand(w, DOT, NATIVE_DOT)
    msk = rmask[:, None] & kmask[None, :]
    a = tl.load(a_ptr + rows[:, None] * D + ks[None, :], mask=msk, other=0.0).to(ACC)
    if ALIGNED:
        dz = tl.load(dz_ptr + rows[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        de = tl.dot(dot_operand(dz, DOT, NATIVE_DOT), w, input_precision=PRECISION, out_dtype=ACC)
        b = tl.load(b_ptr + rows[:, None] * D + ks[None, :], mask=msk, other=0.0).to(ACC)
        if DISTANCE:
            ta = 2.0 * (a - b) * de
            tb = -ta
        else:
            ta = de * b
            tb = de * a
        tl.store(ga_ptr + rows[:, None] * D + ks[None, :], cast_rounded(ta, ga_ptr.dtype.element_ty), mask=msk)
        tl.store(gb_ptr + rows[:, None] * D + ks[None, :], cast_rounded(tb, gb_ptr.dtype.element_ty), mask=msk)
    else:
        s = tl.program_id(1).to(tl.int64)
        start = s * cols_per_split  # int64, and so is c: c * s_c passes 2^31 at large Nx * Ny * m
        end = tl.minimum(start + cols_per_split, C)
        acc = tl.zeros((BLOCK_R, BLOCK_K), ACC)
        for c in range(start, end):
            dz = tl.load(dz_ptr + rows[:, None] * s_r + c * s_c + ms[None, :],
                         mask=rmask[:, None] & mmask[None, :], other=0.0)
            de = tl.dot(dot_operand(dz, DOT, NATIVE_DOT), w, input_precision=PRECISION, out_dtype=ACC)
            b = tl.load(b_ptr + c * D + ks, mask=kmask, other=0.0).to(ACC)
            if DISTANCE:
                t = 2.0 * (a - b[None, :]) * de
                acc += t
                tb = -tl.sum(t, axis=0)
            else:
                acc += de * b[None, :]
                tb = tl.sum(de * a, axis=0)
            tl.store(gb_ptr + (tl.program_id(0).to(tl.int64) * C + c) * D + ks, tb, mask=kmask)
        tl.store(ga_ptr + (s * R + rows[:, None]) * D + ks[None, :], acc, mask=msk)


@triton.jit
def _grad_weight_kernel(a_ptr, b_ptr, dz_ptr, part_ptr, P, Ny, D, M, pairs_per_split,
                        ACC: tl.constexpr, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, DISTANCE: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_MW: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, ms, ks] = sum over the pairs p of split s (in order) of dz[p, ms] e[p, ks]."""
    ms = tl.program_id(0) * BLOCK_MW + tl.arange(0, BLOCK_MW)
    mmask = ms < M
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < D
    s = tl.program_id(2)
    start = s * pairs_per_split
    end = tl.minimum(start + pairs_per_split, P)
    acc = tl.zeros((BLOCK_MW, BLOCK_K), ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        i, j = _pair_index(p, Ny, ALIGNED)
        dzt = tl.load(dz_ptr + p.to(tl.int64)[None, :] * M + ms[:, None],
                      mask=mmask[:, None] & pmask[None, :], other=0.0)
        e = _e_tile(a_ptr, b_ptr, i, j, pmask, ks, kmask, D, ACC, DISTANCE)
        acc = tl.dot(dot_operand(dzt, DOT, NATIVE_DOT), dot_operand(e, DOT, NATIVE_DOT), acc,
                     input_precision=PRECISION, out_dtype=ACC)
    ptrs = part_ptr + (s.to(tl.int64) * M + ms[:, None]) * D + ks[None, :]
    tl.store(ptrs, acc, mask=mmask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _block_m(m: int) -> int:
    return _pow2(m)


def _block_p(block_m: int, tensor_cores: bool) -> int:
    """Pairs per program of the (BLOCK_P, BLOCK_M) z tile (and rows per step of the row gradients).

    Tensor-core products (16-bit, TF32) take 64 pairs where about 16K accumulators allow it: sm_90's
    ``wgmma`` works on 64-row tiles, and at 32 rows (m = 256) these kernels compiled to the older
    ``mma``. Full fp32 / fp64 runs on the CUDA cores at half that per thread (``_num_warps``): about
    8K, 32 pairs at m = 256, where 16 spent twice the L2 traffic on W (each program reads all of it).
    """
    budget = 16384 if tensor_cores else 8192
    return max(16, min(64, budget // block_m))


def _num_warps(block_p: int, block_m: int, tensor_cores: bool) -> int:
    """4 warps, or 8 (two warpgroups) where 4 would hold more than 64 (tensor cores) or 32 (CUDA cores)
    elements of a (pairs, m) tile (z, dz) per thread."""
    per_thread_at_4 = block_p * block_m // 128
    return 8 if per_thread_at_4 > (64 if tensor_cores else 32) else 4


def _block_k(d: int, cap: int) -> int:
    return min(cap, _pow2(d))


def _check_mode(mode: str) -> bool:
    if mode not in ("distance", "direction"):
        raise ValueError(f"pairwise_similarity: mode must be 'distance' or 'direction', got {mode!r}")
    return mode == "distance"


def _l2norm_rows(v: Tensor, acc: torch.dtype, eps: float) -> tuple[Tensor, Tensor]:
    """(l2norm(v) in acc, ||v|| (rows, 1) in acc), exactly as the reference computes them."""
    va = v.to(acc)
    n = va.pow(2).sum(-1, keepdim=True).sqrt()
    return va / (n + eps), n


def _l2norm_backward(v: Tensor, n: Tensor, du: Tensor, eps: float) -> Tensor:
    """dv for u = v / (||v|| + eps): du / r - v (v . du) / (r^2 ||v||), second term 0 where ||v|| = 0."""
    va = v.to(du.dtype)
    r = n + eps
    coef = torch.where(n > 0, (va * du).sum(-1, keepdim=True) / (r * r) / torch.where(n > 0, n, 1.0), 0.0)
    return du / r - va * coef


class _Setup:
    """Contiguous inputs, the a / b rows the kernels read, shapes and the accumulation dtype."""

    def __init__(self, x, y, weight, bias, mode, eps, aligned):
        self.distance = _check_mode(mode)
        self.aligned = bool(aligned)
        self.x, self.y, self.w = x.contiguous(), y.contiguous(), weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.nx, self.ny, self.d = x.shape[0], y.shape[0], x.shape[1]
        self.m = weight.shape[0]
        if self.aligned and self.nx != self.ny:
            raise ValueError(f"pairwise_similarity: aligned needs x and y of equal length, got {self.nx} and {self.ny}")
        self.p = self.nx if self.aligned else self.nx * self.ny
        self.acc = acc_dtype(x.dtype)
        self.precision = dot_precision(x.dtype)
        self.native_dot = native_dot(x.dtype, x.device)
        self.wide = keeps_fp32_operands(x.dtype, self.distance)
        if self.wide:
            self.precision = "tf32"
        self.eps = float(eps)
        if self.distance:
            self.a, self.b, self.xn, self.yn = self.x, self.y, None, None
        else:
            self.a, self.xn = _l2norm_rows(self.x, self.acc, self.eps)
            self.b, self.yn = _l2norm_rows(self.y, self.acc, self.eps)
        # fp32 / fp64 tiles hold twice the bytes of 16-bit ones; halving their d blocks (and, off the tensor
        # cores, their pair blocks) keeps the sm_90 kernels within the register file (0.9 KB had spilled)
        self.halved = 2 if x.element_size() > 2 or self.wide else 1
        self.block_m = _block_m(self.m)
        self.tensor_cores = x.element_size() == 2 or self.precision == "tf32"
        self.block_p = _block_p(self.block_m, self.tensor_cores)
        self.block_k = _block_k(self.d, BLOCK_K // self.halved)
        # a device scalar in the accumulation dtype (a Python float argument would be fp32)
        self.eps_t = torch.full((1,), self.eps, dtype=self.acc, device=x.device)

    @property
    def dots(self) -> dict:
        """The constexprs of every kernel's tl.dot: accumulation and operand dtypes, native 16-bit, precision."""
        dot = torch.float32 if self.wide else self.x.dtype
        return dict(ACC=tl_dtype(self.acc), DOT=tl_dtype(dot), NATIVE_DOT=self.native_dot, PRECISION=self.precision)

    @property
    def out_shape(self) -> tuple:
        return (self.nx, self.m) if self.aligned else (self.nx, self.ny, self.m)

    def pairs(self, g: Tensor | None, out: Tensor, norm: Tensor, saved: Tensor | None = None) -> None:
        """Forward (g None): out and norm. Backward: dz of grad_out ``g`` into ``out``; with fp32 / fp64
        outputs z is recovered from the forward's ``saved`` output and ``norm``, else recomputed."""
        w = self.w
        recover = g is not None and self.x.element_size() > 2
        # recovering z is element-wise: no product, so no 64-row tiles for the tensor cores
        tensor_cores = self.tensor_cores and not recover
        block_p = _block_p(self.block_m, tensor_cores)
        _pairs_kernel[(triton.cdiv(self.p, block_p),)](
            self.a, self.b, w, w if self.bias is None else self.bias, self.eps_t,
            out if g is None else g, out if saved is None else saved, out, norm,
            self.p, self.ny, self.d, self.m,
            **self.dots, DISTANCE=self.distance, ALIGNED=self.aligned,
            HAS_BIAS=self.bias is not None, GRAD=g is not None, RECOVER=recover,
            BLOCK_P=block_p, BLOCK_M=self.block_m, BLOCK_K=self.block_k,
            num_warps=_num_warps(block_p, self.block_m, tensor_cores),
        )


def _split_count(n_steps: int, other_programs: int, device: torch.device) -> int:
    """``_common.split_count`` towards TARGET_PROGRAMS_CUDA, or TARGET_PROGRAMS_CPU in the interpreter."""
    return split_count(n_steps, other_programs, TARGET_PROGRAMS_CUDA if device.type == "cuda" else TARGET_PROGRAMS_CPU)


def _grad_ends(s: _Setup, dz: Tensor, gx_dtype: torch.dtype, gy_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(gradient of the a rows, of the b rows) from ``_grad_ends_kernel``: one product with W per pair.

    All pairs: the larger side is the kernel's rows (its tiles fill up), the smaller their partners.
    """
    device = dz.device
    if s.p == 0 or s.d == 0:
        return (torch.zeros((s.nx, s.d), dtype=gx_dtype, device=device),
                torch.zeros((s.ny, s.d), dtype=gy_dtype, device=device))
    block_k = _block_k(s.d, BLOCK_KE // s.halved)
    n_k = triton.cdiv(s.d, block_k)
    common = dict(**s.dots, DISTANCE=s.distance, ALIGNED=s.aligned,
                  BLOCK_R=s.block_p, BLOCK_M=s.block_m, BLOCK_K=block_k,
                  num_warps=_num_warps(s.block_p, s.block_m, s.tensor_cores))  # its dz tile: the z tile's size
    if s.aligned:
        gx = torch.empty((s.nx, s.d), dtype=gx_dtype, device=device)
        gy = torch.empty((s.ny, s.d), dtype=gy_dtype, device=device)
        _grad_ends_kernel[(triton.cdiv(s.nx, s.block_p), 1, n_k)](
            s.a, s.b, s.w, dz, gx, gy, s.nx, s.nx, s.d, s.m, s.m, 0, 1, **common)
        return gx, gy
    x_rows = s.nx >= s.ny
    a, b = (s.a, s.b) if x_rows else (s.b, s.a)
    n_rows, n_cols = (s.nx, s.ny) if x_rows else (s.ny, s.nx)
    s_r, s_c = (s.ny * s.m, s.m) if x_rows else (s.m, s.ny * s.m)
    n_r = triton.cdiv(n_rows, s.block_p)
    split = _split_count(n_cols, n_r * n_k, device)
    cols_per_split = triton.cdiv(n_cols, split)
    split = triton.cdiv(n_cols, cols_per_split)
    part_rows = torch.empty((split, n_rows, s.d), dtype=s.acc, device=device)
    part_cols = torch.empty((n_r, n_cols, s.d), dtype=s.acc, device=device)
    _grad_ends_kernel[(n_r, split, n_k)](
        a, b, s.w, dz, part_rows, part_cols, n_rows, n_cols, s.d, s.m, s_r, s_c, cols_per_split, **common)
    g_rows, g_cols = sum_partials(part_rows), sum_partials(part_cols)
    gx, gy = (g_rows, g_cols) if x_rows else (g_cols, g_rows)
    return gx.to(gx_dtype), gy.to(gy_dtype)


def _grad_weight(s: _Setup, dz: Tensor) -> Tensor:
    device = dz.device
    if s.p == 0 or s.m == 0 or s.d == 0:
        return torch.zeros((s.m, s.d), dtype=s.w.dtype, device=device)
    block_mw = min(BLOCK_MW, s.block_m)
    block_kw = _block_k(s.d, BLOCK_KW // s.halved)
    n_mk = triton.cdiv(s.m, block_mw) * triton.cdiv(s.d, block_kw)
    n_blocks = triton.cdiv(s.p, BLOCK_PW)
    split = _split_count(n_blocks, n_mk, device)
    pairs_per_split = triton.cdiv(n_blocks, split) * BLOCK_PW
    split = triton.cdiv(s.p, pairs_per_split)
    part = torch.empty((split, s.m, s.d), dtype=s.acc, device=device)
    _grad_weight_kernel[(triton.cdiv(s.m, block_mw), triton.cdiv(s.d, block_kw), split)](
        s.a, s.b, dz, part, s.p, s.ny, s.d, s.m, pairs_per_split,
        **s.dots, DISTANCE=s.distance, ALIGNED=s.aligned,
        BLOCK_P=BLOCK_PW, BLOCK_MW=block_mw, BLOCK_K=block_kw,
    )
    gw = sum_partials(part)
    return gw.to(s.w.dtype)


# ----------------------------------------------------------------------------- launchers
def forward(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, mode: str, eps: float, aligned: bool
) -> tuple[Tensor, Tensor]:
    """(out (Nx, Ny, m) or (N, m) in the input dtype, norm (Nx, Ny) or (N,) in the accumulation dtype)."""
    s = _Setup(x, y, weight, bias, mode, eps, aligned)
    out = torch.empty(s.out_shape, dtype=x.dtype, device=x.device)
    norm = torch.empty(s.out_shape[:-1], dtype=s.acc, device=x.device)
    if s.p > 0:
        s.pairs(None, out, norm)
    return out, norm


def backward(
    grad_out: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    norm: Tensor,
    mode: str,
    eps: float,
    aligned: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_y, grad_weight, grad_bias), each in its input's dtype; grad_bias is (0,) without bias.

    fp32 / fp64: z is recovered as out * (norm + eps). fp16 / bf16: z is recomputed from x, y,
    weight and bias, since ``out`` was rounded (``out`` and ``norm`` are not read).
    """
    s = _Setup(x, y, weight, bias, mode, eps, aligned)
    device = x.device
    # dz of every pair, (P, m) in the accumulation dtype (the size of grad_out)
    dz = torch.empty((s.p, s.m), dtype=s.acc, device=device)
    if s.p > 0:
        s.pairs(grad_out.contiguous(), dz, norm.contiguous(), saved=out.contiguous())
    grad_bias = (
        torch.empty((0,), dtype=weight.dtype, device=device)
        if bias is None
        else dz.sum(0).to(bias.dtype)
    )
    # the gradients themselves (distance) or those of l2norm(x) / l2norm(y) (direction)
    gx, gy = _grad_ends(s, dz, x.dtype if s.distance else s.acc, y.dtype if s.distance else s.acc)
    if not s.distance:
        gx = _l2norm_backward(s.x, s.xn, gx, s.eps).to(x.dtype)
        gy = _l2norm_backward(s.y, s.yn, gy, s.eps).to(y.dtype)
    grad_weight = _grad_weight(s, dz)
    return gx, gy, grad_weight, grad_bias
