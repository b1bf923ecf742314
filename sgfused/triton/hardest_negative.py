"""Triton kernels for in-batch hardest-negative mining (docs/hardest_negative_contract.md).

Semantics: docs/hardest_negative_contract.md; ground truth: sgfused/reference/hardest_negative.py.
The four launchers at the bottom are wrapped as ``torch.library.custom_op`` by sgfused.ops.

Everything is written for a generic matrix ``X (R, C)`` whose tiles come from ``_tile``: either a
stored score matrix (any strides, so ``X`` can be ``S`` or ``S^T``) or ``A @ B^T`` computed with
``tl.dot`` from embeddings (``A, B = img, cap`` for ``S``, ``cap, img`` for ``S^T``). Kernels that
work "per column" therefore also serve the rows, by running on the transposed problem.

Kernels:

* ``_hardest_kernel``: one program per block of columns, loops over row tiles; max / argmax over
  the negative rows (lowest index on ties, -1 if none). On ``S`` -> ``hard_img``, on ``S^T`` -> ``hard_cap``.
  From embeddings one pass gives both: each ``A @ B^T`` tile also yields its rows' maxima over the
  program's columns, into (column blocks, Ni) partials that torch reduces (the products are the
  cost there, so computing every tile once instead of twice halves the forward's work).
* ``_positive_kernel``: one program per block of captions, loops over each caption's positive rows
  (a contiguous range of the id-sorted rows); sums ``cost_cap + cost_img`` into ``per_caption``.
  For the sum of hinges it scans the positive's row and column (``_hinge_scans``); with GRAD it
  writes the score gradient of the positives instead (sum-of-hinges backward).
* ``_mv_weight_kernel`` (max_violation backward): per column, the gradient that reaches its
  hardest negative, sum over its positives of ``g`` where the hinge is active.
* ``_grad_scores_kernel``: one program per (row, column) tile of ``grad_scores``.
* ``_embed_grad_kernel``: one program per (row block, embedding chunk) of ``grad_img`` (on ``S``)
  or ``grad_cap`` (on ``S^T``): sparse gathers for max_violation, ``G_tile @ B_tile`` for the sum of
  hinges with ``G`` recomputed tile by tile (``_neg_hinge_grad``).

All arithmetic is in the accumulation dtype (fp32, fp64 for fp64 input); ``tl.dot`` runs in full
precision, or TF32 for fp32 inputs when the user allows it (``_common.dot_precision``). No atomics, every output
element is written by one program in a fixed order, so results are deterministic. The launchers'
only extra memory is O(Ni + Nc) (sorted ids, ranges, per-row / per-column maxima and weights), plus
the row partials of the embedding forward, 8 bytes x Ni x ceil(Nc / 64) (32 MiB at Ni = Nc = 16384).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, dot_precision, native_dot, tl_dtype, widened

BLOCK = 64  # rows / columns of a score tile
BLOCK_K = 64  # length of a scan tile in the sum-of-hinges scans
BLOCK_D = 32  # embedding chunk of one tl.dot
BLOCK_DO = 128  # embedding columns of the gradient per program (embed backward; halved for 4- and 8-byte inputs)
BLOCK_GRAD_R = 32  # rows of a grad_scores tile: a 64 x 64 tile at two warps spilled on sm_90
# Triton 3.6's layout pass (TritonGPURemoveLayoutConversions) breaks on the gathered-index loops of
# the backward kernels at 4 warps ("mask type matches ptr type"); at 2 they compile on 3.6 and later.
LAYOUT_SAFE_WARPS = 2


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _tile(x_ptr, a_ptr, b_ptr, rows, cols, rmask, cmask, D, sxr, sxc,
          ACC: tl.constexpr, EMBED: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """``X[rows[:, None], cols[None, :]]`` in ACC (0 where masked); rows / cols may be gathered indices."""
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    if EMBED:
        res = tl.zeros((rows.shape[0], cols.shape[0]), ACC)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            a = widened(tl.load(a_ptr + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                                other=0.0), ACC, NATIVE_DOT)
            b = widened(tl.load(b_ptr + cols[None, :] * D + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                                other=0.0), ACC, NATIVE_DOT)
            res = tl.dot(a, b, res, input_precision=PRECISION, out_dtype=ACC)
    else:
        ptrs = x_ptr + rows[:, None] * sxr + cols[None, :] * sxc
        res = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    return res


@triton.jit
def _pair(x_ptr, a_ptr, b_ptr, rows, cols, mask, D, sxr, sxc,
          ACC: tl.constexpr, EMBED: tl.constexpr, BLOCK_D: tl.constexpr):
    """``X[rows[p], cols[p]]`` for every p, in ACC (0 where masked)."""
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    if EMBED:
        res = tl.zeros((rows.shape[0],), ACC)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            m = mask[:, None] & (ks < D)[None, :]
            a = tl.load(a_ptr + rows[:, None] * D + ks[None, :], mask=m, other=0.0).to(ACC)
            b = tl.load(b_ptr + cols[:, None] * D + ks[None, :], mask=m, other=0.0).to(ACC)
            res += tl.sum(a * b, axis=1)
    else:
        res = tl.load(x_ptr + rows * sxr + cols * sxc, mask=mask, other=0.0).to(ACC)
    return res


@triton.jit
def _hinge_scans(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                 prow, pcol, pid_, base, valid,
                 ACC: tl.constexpr, EMBED: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """For positive pairs (prow[p], pcol[p]) of id pid_[p], with base[p] = margin - X[prow, pcol]:
    the sum and the number of the active hinges ``base + X[prow, k]`` over the negative columns k of
    row prow, plus ``base + X[k, pcol]`` over the negative rows k of column pcol."""
    along_row = tl.zeros(base.shape, ACC)
    along_col = tl.zeros(base.shape, ACC)
    count = tl.zeros(base.shape, ACC)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < C
        kid = tl.load(col_ids_ptr + ks, mask=kmask, other=0)
        s = _tile(x_ptr, a_ptr, b_ptr, prow, ks, valid, kmask, D, sxr, sxc, ACC, EMBED, NATIVE_DOT, PRECISION, BLOCK_D)
        h = base[:, None] + s
        act = valid[:, None] & kmask[None, :] & (kid[None, :] != pid_[:, None]) & (h > 0)
        along_row += tl.sum(tl.where(act, h, 0.0), axis=1)
        count += tl.sum(act.to(ACC), axis=1)
    for k0 in range(0, R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < R
        kid = tl.load(row_ids_ptr + ks, mask=kmask, other=0)
        # transposed to (positive, k): every per-positive vector keeps one layout in both loops
        s = tl.trans(_tile(x_ptr, a_ptr, b_ptr, ks, pcol, kmask, valid, D, sxr, sxc,
                           ACC, EMBED, NATIVE_DOT, PRECISION, BLOCK_D))
        h = base[:, None] + s
        act = valid[:, None] & kmask[None, :] & (kid[None, :] != pid_[:, None]) & (h > 0)
        along_col += tl.sum(tl.where(act, h, 0.0), axis=1)
        count += tl.sum(act.to(ACC), axis=1)
    return along_row + along_col, count


@triton.jit
def _neg_hinge_grad(x_ptr, a_ptr, b_ptr, D, sxr, sxc, s, rows, cols, rmask, cmask, neg,
                    col_perm_ptr, row_lo_ptr, row_hi_ptr, row_perm_ptr, col_lo_ptr, col_hi_ptr,
                    margin, g_ptr,
                    ACC: tl.constexpr, EMBED: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum-of-hinges gradient of the negative entries of the tile ``s = X[rows, cols]`` (0 elsewhere).

    Entry (r, k) gets the weight g of every positive (r, c) of its row and every positive (i, k) of
    its column whose hinge against it is active. The weight is g[the caption of the positive]: its
    column in S, i.e. its row in X when TRANSPOSED.
    """
    grad = tl.zeros(s.shape, ACC)
    lo = tl.load(row_lo_ptr + rows, mask=rmask, other=0)
    cnt = tl.where(rmask, tl.load(row_hi_ptr + rows, mask=rmask, other=0) - lo, 0)
    for j in range(0, tl.max(cnt, axis=0)):
        valid = j < cnt
        pcol = tl.load(col_perm_ptr + lo + j, mask=valid, other=0)
        base = margin - _pair(x_ptr, a_ptr, b_ptr, rows, pcol, valid, D, sxr, sxc, ACC, EMBED, BLOCK_D)
        if TRANSPOSED:
            w = tl.load(g_ptr + rows, mask=valid, other=0.0)
        else:
            w = tl.load(g_ptr + pcol, mask=valid, other=0.0)
        act = neg & valid[:, None] & (base[:, None] + s > 0)
        grad += tl.where(act, w[:, None], 0.0)
    lo = tl.load(col_lo_ptr + cols, mask=cmask, other=0)
    cnt = tl.where(cmask, tl.load(col_hi_ptr + cols, mask=cmask, other=0) - lo, 0)
    for j in range(0, tl.max(cnt, axis=0)):
        valid = j < cnt
        prow = tl.load(row_perm_ptr + lo + j, mask=valid, other=0)
        base = margin - _pair(x_ptr, a_ptr, b_ptr, prow, cols, valid, D, sxr, sxc, ACC, EMBED, BLOCK_D)
        if TRANSPOSED:
            w = tl.load(g_ptr + prow, mask=valid, other=0.0)
        else:
            w = tl.load(g_ptr + cols, mask=valid, other=0.0)
        act = neg & valid[None, :] & (base[None, :] + s > 0)
        grad += tl.where(act, w[None, :], 0.0)
    return grad


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _hardest_kernel(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                    max_ptr, idx_ptr, part_max_ptr, part_idx_ptr,
                    ACC: tl.constexpr, EMBED: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                    ROWS_TOO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per column of X: max over its negative rows and the lowest row reaching it (-inf / -1 if none).

    ROWS_TOO: from the same tiles, per row, the max over the negative columns of this program's block
    and the lowest column reaching it, into row ``program_id`` of the (column blocks, R) partials.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cid = tl.load(col_ids_ptr + cols, mask=cmask, other=0)
    best = tl.full((BLOCK_C,), float("-inf"), ACC)
    best_idx = tl.full((BLOCK_C,), -1, tl.int64)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        rid = tl.load(row_ids_ptr + rows, mask=rmask, other=0)
        s = _tile(x_ptr, a_ptr, b_ptr, rows, cols, rmask, cmask, D, sxr, sxc, ACC, EMBED, NATIVE_DOT, PRECISION, BLOCK_D)
        neg = rmask[:, None] & cmask[None, :] & (rid[:, None] != cid[None, :])
        s = tl.where(neg, s, float("-inf"))
        tile_max = tl.max(s, axis=0)
        tile_idx = tl.min(tl.where(s == tile_max[None, :], rows[:, None], R), axis=0)
        if ROWS_TOO:
            row_max = tl.max(s, axis=1)
            row_idx = tl.min(tl.where(s == row_max[:, None], cols[None, :], C), axis=1)
            row_idx = tl.where(row_max > float("-inf"), row_idx, -1)
            part = tl.program_id(0).to(tl.int64) * R + rows
            tl.store(part_max_ptr + part, row_max, mask=rmask)
            tl.store(part_idx_ptr + part, row_idx.to(part_idx_ptr.dtype.element_ty), mask=rmask)
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(max_ptr + cols, best, mask=cmask)
    tl.store(idx_ptr + cols, best_idx, mask=cmask)


@triton.jit
def _positive_kernel(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                     row_perm_ptr, col_lo_ptr, col_hi_ptr,
                     row_max_ptr, hard_cap_ptr, col_max_ptr, hard_img_ptr,
                     margin_ptr, g_ptr, out_ptr, grad_ptr, sgr, sgc,
                     ACC: tl.constexpr, EMBED: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                     MAX_VIOLATION: tl.constexpr, GRAD: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per caption c (column of S): sum over its positive rows i (increasing i) of cost_cap + cost_img.

    GRAD (sum of hinges only): write grad[i, c] = -g[c] * (number of active hinges of (i, c)) instead.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cid = tl.load(col_ids_ptr + cols, mask=cmask, other=0)
    lo = tl.load(col_lo_ptr + cols, mask=cmask, other=0)
    cnt = tl.where(cmask, tl.load(col_hi_ptr + cols, mask=cmask, other=0) - lo, 0)
    margin = tl.load(margin_ptr)
    total = tl.zeros((BLOCK_C,), ACC)
    if MAX_VIOLATION:
        col_max = tl.load(col_max_ptr + cols, mask=cmask, other=0.0)
        hard_img = tl.load(hard_img_ptr + cols, mask=cmask, other=-1)
    for j in range(0, tl.max(cnt, axis=0)):
        valid = j < cnt
        prow = tl.load(row_perm_ptr + lo + j, mask=valid, other=0)
        base = margin - _pair(x_ptr, a_ptr, b_ptr, prow, cols, valid, D, sxr, sxc, ACC, EMBED, BLOCK_D)
        if MAX_VIOLATION:
            row_max = tl.load(row_max_ptr + prow, mask=valid, other=0.0)
            hard_cap = tl.load(hard_cap_ptr + prow, mask=valid, other=-1)
            cost_cap = tl.where(hard_cap >= 0, tl.maximum(base + row_max, 0.0), 0.0)
            cost_img = tl.where(hard_img >= 0, tl.maximum(base + col_max, 0.0), 0.0)
            total += tl.where(valid, cost_cap + cost_img, 0.0)
        else:
            hinge, count = _hinge_scans(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                                        prow, cols, cid, base, valid, ACC, EMBED, NATIVE_DOT, PRECISION, BLOCK_K, BLOCK_D)
            if GRAD:
                g = tl.load(g_ptr + cols, mask=valid, other=0.0)
                ptrs = grad_ptr + prow.to(tl.int64) * sgr + cols.to(tl.int64) * sgc
                tl.store(ptrs, (-g * count).to(grad_ptr.dtype.element_ty), mask=valid)
            else:
                total += hinge
    if not GRAD:
        tl.store(out_ptr + cols, total, mask=cmask)


@triton.jit
def _mv_weight_kernel(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                      row_perm_ptr, col_lo_ptr, col_hi_ptr, hard_ptr, margin_ptr, g_ptr,
                      weight_ptr, max_ptr,
                      ACC: tl.constexpr, EMBED: tl.constexpr, TRANSPOSED: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """max_violation backward, per column k of X: max_ptr[k] = X[hard[k], k] (-inf if none) and
    weight_ptr[k] = sum over the positives (i, k) whose hinge against it is active of g[caption]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lo = tl.load(col_lo_ptr + cols, mask=cmask, other=0)
    cnt = tl.where(cmask, tl.load(col_hi_ptr + cols, mask=cmask, other=0) - lo, 0)
    hard = tl.load(hard_ptr + cols, mask=cmask, other=-1)
    has_neg = hard >= 0
    col_max = _pair(x_ptr, a_ptr, b_ptr, hard, cols, has_neg, D, sxr, sxc, ACC, EMBED, BLOCK_D)
    margin = tl.load(margin_ptr)
    weight = tl.zeros((BLOCK_C,), ACC)
    for j in range(0, tl.max(cnt, axis=0)):
        valid = j < cnt
        prow = tl.load(row_perm_ptr + lo + j, mask=valid, other=0)
        base = margin - _pair(x_ptr, a_ptr, b_ptr, prow, cols, valid, D, sxr, sxc, ACC, EMBED, BLOCK_D)
        if TRANSPOSED:
            g = tl.load(g_ptr + prow, mask=valid, other=0.0)
        else:
            g = tl.load(g_ptr + cols, mask=valid, other=0.0)
        weight += tl.where(valid & has_neg & (base + col_max > 0), g, 0.0)
    tl.store(weight_ptr + cols, weight, mask=cmask)
    tl.store(max_ptr + cols, tl.where(has_neg, col_max, float("-inf")), mask=cmask)


@triton.jit
def _grad_scores_kernel(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                        col_perm_ptr, row_lo_ptr, row_hi_ptr, row_perm_ptr, col_lo_ptr, col_hi_ptr,
                        row_max_ptr, hard_cap_ptr, row_weight_ptr, col_max_ptr, hard_img_ptr, col_weight_ptr,
                        margin_ptr, g_ptr, grad_ptr, sgr, sgc,
                        ACC: tl.constexpr, MAX_VIOLATION: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile of grad_scores. Sum of hinges: negatives only (positives are 0, _positive_kernel fills them)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    rid = tl.load(row_ids_ptr + rows, mask=rmask, other=0)
    cid = tl.load(col_ids_ptr + cols, mask=cmask, other=0)
    s = _tile(x_ptr, a_ptr, b_ptr, rows, cols, rmask, cmask, D, sxr, sxc, ACC, False, False, "ieee", 16)  # a score tile: no tl.dot
    inside = rmask[:, None] & cmask[None, :]
    pos = rid[:, None] == cid[None, :]
    neg = inside & ~pos
    margin = tl.load(margin_ptr)
    if MAX_VIOLATION:
        row_max = tl.load(row_max_ptr + rows, mask=rmask, other=0.0)
        hard_cap = tl.load(hard_cap_ptr + rows, mask=rmask, other=-1)
        row_weight = tl.load(row_weight_ptr + rows, mask=rmask, other=0.0)
        col_max = tl.load(col_max_ptr + cols, mask=cmask, other=0.0)
        hard_img = tl.load(hard_img_ptr + cols, mask=cmask, other=-1)
        col_weight = tl.load(col_weight_ptr + cols, mask=cmask, other=0.0)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
        base = margin - s
        cap_active = (hard_cap[:, None] >= 0) & (base + row_max[:, None] > 0)
        img_active = (hard_img[None, :] >= 0) & (base + col_max[None, :] > 0)
        grad_pos = -(tl.where(cap_active, g, 0.0) + tl.where(img_active, g, 0.0))
        grad_neg = (tl.where(cols[None, :] == hard_cap[:, None], row_weight[:, None], 0.0)
                    + tl.where(rows[:, None] == hard_img[None, :], col_weight[None, :], 0.0))
        grad = tl.where(pos, grad_pos, grad_neg)
    else:
        grad = _neg_hinge_grad(x_ptr, a_ptr, b_ptr, D, sxr, sxc, s, rows, cols, rmask, cmask, neg,
                               col_perm_ptr, row_lo_ptr, row_hi_ptr, row_perm_ptr, col_lo_ptr, col_hi_ptr,
                               margin, g_ptr, ACC, False, False, 16)
    ptrs = grad_ptr + rows.to(tl.int64)[:, None] * sgr + cols.to(tl.int64)[None, :] * sgc
    tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _embed_grad_kernel(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                       col_perm_ptr, row_lo_ptr, row_hi_ptr, row_perm_ptr, col_lo_ptr, col_hi_ptr,
                       row_max_ptr, hard_r_ptr, weight_r_ptr, col_max_ptr, hard_c_ptr, weight_c_ptr,
                       inv_perm_ptr, inv_lo_ptr, inv_hi_ptr,
                       margin_ptr, g_ptr, out_ptr,
                       ACC: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, MAX_VIOLATION: tl.constexpr,
                       TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """out[rows, dcols] = (dLoss/dX @ B)[rows, dcols] for X = A @ B^T, i.e. the gradient of A.

    max_violation: dLoss/dX is sparse: in row r, its positives, (r, hard_r[r]) with weight_r[r], and
    (r, k) with weight_c[k] for every column k whose hardest negative is r (inv_* lists those k).
    Sum of hinges: X tiles are recomputed, their negative gradient formed (_neg_hinge_grad) and
    multiplied by B tiles; the positives of the row are added after.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    rmask = rows < R
    dmask = dcols < D
    rid = tl.load(row_ids_ptr + rows, mask=rmask, other=0)
    margin = tl.load(margin_ptr)
    out = tl.zeros((BLOCK_R, BLOCK_DO), ACC)
    lo = tl.load(row_lo_ptr + rows, mask=rmask, other=0)
    cnt = tl.where(rmask, tl.load(row_hi_ptr + rows, mask=rmask, other=0) - lo, 0)
    if MAX_VIOLATION:
        hard = tl.load(hard_r_ptr + rows, mask=rmask, other=-1)
        row_max = tl.load(row_max_ptr + rows, mask=rmask, other=0.0)
        weight = tl.load(weight_r_ptr + rows, mask=rmask, other=0.0)
        bh = tl.load(b_ptr + hard.to(tl.int64)[:, None] * D + dcols[None, :],
                     mask=(hard >= 0)[:, None] & dmask[None, :], other=0.0).to(ACC)
        out += weight[:, None] * bh
        for j in range(0, tl.max(cnt, axis=0)):
            valid = j < cnt
            pcol = tl.load(col_perm_ptr + lo + j, mask=valid, other=0)
            base = margin - _pair(x_ptr, a_ptr, b_ptr, rows, pcol, valid, D, sxr, sxc, ACC, True, BLOCK_D)
            hard_c = tl.load(hard_c_ptr + pcol, mask=valid, other=-1)
            col_max = tl.load(col_max_ptr + pcol, mask=valid, other=0.0)
            if TRANSPOSED:
                g = tl.load(g_ptr + rows, mask=valid, other=0.0)
            else:
                g = tl.load(g_ptr + pcol, mask=valid, other=0.0)
            w = -(tl.where((hard >= 0) & (base + row_max > 0), g, 0.0)
                  + tl.where((hard_c >= 0) & (base + col_max > 0), g, 0.0))
            w = tl.where(valid, w, 0.0)
            bp = tl.load(b_ptr + pcol.to(tl.int64)[:, None] * D + dcols[None, :],
                         mask=valid[:, None] & dmask[None, :], other=0.0).to(ACC)
            out += w[:, None] * bp
        ilo = tl.load(inv_lo_ptr + rows, mask=rmask, other=0)
        icnt = tl.where(rmask, tl.load(inv_hi_ptr + rows, mask=rmask, other=0) - ilo, 0)
        for j in range(0, tl.max(icnt, axis=0)):
            valid = j < icnt
            k = tl.load(inv_perm_ptr + ilo + j, mask=valid, other=0)
            w = tl.load(weight_c_ptr + k, mask=valid, other=0.0)
            bk = tl.load(b_ptr + k.to(tl.int64)[:, None] * D + dcols[None, :],
                         mask=valid[:, None] & dmask[None, :], other=0.0).to(ACC)
            out += w[:, None] * bk
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            cid = tl.load(col_ids_ptr + cols, mask=cmask, other=0)
            s = _tile(x_ptr, a_ptr, b_ptr, rows, cols, rmask, cmask, D, sxr, sxc,
                      ACC, True, NATIVE_DOT, PRECISION, BLOCK_D)
            neg = rmask[:, None] & cmask[None, :] & (rid[:, None] != cid[None, :])
            grad = _neg_hinge_grad(x_ptr, a_ptr, b_ptr, D, sxr, sxc, s, rows, cols, rmask, cmask, neg,
                                   col_perm_ptr, row_lo_ptr, row_hi_ptr, row_perm_ptr, col_lo_ptr, col_hi_ptr,
                                   margin, g_ptr, ACC, True, TRANSPOSED, BLOCK_D)
            bt = tl.load(b_ptr + cols.to(tl.int64)[:, None] * D + dcols[None, :],
                         mask=cmask[:, None] & dmask[None, :], other=0.0).to(ACC)
            out = tl.dot(grad, bt, out, input_precision=PRECISION, out_dtype=ACC)
        for j in range(0, tl.max(cnt, axis=0)):
            valid = j < cnt
            pcol = tl.load(col_perm_ptr + lo + j, mask=valid, other=0)
            base = margin - _pair(x_ptr, a_ptr, b_ptr, rows, pcol, valid, D, sxr, sxc, ACC, True, BLOCK_D)
            _, count = _hinge_scans(x_ptr, a_ptr, b_ptr, row_ids_ptr, col_ids_ptr, R, C, D, sxr, sxc,
                                    rows, pcol, rid, base, valid, ACC, True, NATIVE_DOT, PRECISION, BLOCK_K, BLOCK_D)
            if TRANSPOSED:
                g = tl.load(g_ptr + rows, mask=valid, other=0.0)
            else:
                g = tl.load(g_ptr + pcol, mask=valid, other=0.0)
            bp = tl.load(b_ptr + pcol.to(tl.int64)[:, None] * D + dcols[None, :],
                         mask=valid[:, None] & dmask[None, :], other=0.0).to(ACC)
            out += tl.where(valid, -g * count, 0.0)[:, None] * bp
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + dcols[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------- launch helpers
@dataclass(frozen=True)
class _Problem:
    """``X (R, C)``: a stored matrix (``x`` with strides ``sxr, sxc``) or ``a @ b^T`` (EMBED), with the
    ids of its rows / columns and the CSR lists of its positives (increasing indices within a list):
    row r's positive columns are ``col_perm[row_lo[r]:row_hi[r]]``, column k's positive rows
    ``row_perm[col_lo[k]:col_hi[k]]``."""

    x: Tensor
    a: Tensor
    b: Tensor
    row_ids: Tensor
    col_ids: Tensor
    n_rows: int
    n_cols: int
    d: int
    sxr: int
    sxc: int
    embed: bool
    transposed: bool
    col_perm: Tensor
    row_lo: Tensor
    row_hi: Tensor
    row_perm: Tensor
    col_lo: Tensor
    col_hi: Tensor
    acc: torch.dtype
    native_dot: bool  # fp16 / bf16 operands straight to tl.dot (_common.native_dot)
    precision: str  # tl.dot's input_precision (_common.dot_precision)

    @staticmethod
    def build(x, a, b, row_ids, col_ids, n_rows, n_cols, d, sxr, sxc, embed) -> "_Problem":
        row_sorted, row_perm = torch.sort(row_ids, stable=True)
        col_sorted, col_perm = torch.sort(col_ids, stable=True)
        dtype = a.dtype
        return _Problem(
            x, a, b, row_ids, col_ids, n_rows, n_cols, d, sxr, sxc, embed, False,
            col_perm,
            torch.searchsorted(col_sorted, row_ids),
            torch.searchsorted(col_sorted, row_ids, right=True),
            row_perm,
            torch.searchsorted(row_sorted, col_ids),
            torch.searchsorted(row_sorted, col_ids, right=True),
            acc_dtype(dtype),
            native_dot(dtype, a.device),
            dot_precision(dtype),
        )

    def t(self) -> "_Problem":
        """The transposed problem ``X^T``."""
        return replace(
            self, a=self.b, b=self.a, row_ids=self.col_ids, col_ids=self.row_ids,
            n_rows=self.n_cols, n_cols=self.n_rows, sxr=self.sxc, sxc=self.sxr, transposed=not self.transposed,
            col_perm=self.row_perm, row_lo=self.col_lo, row_hi=self.col_hi,
            row_perm=self.col_perm, col_lo=self.row_lo, col_hi=self.row_hi,
        )

    @property
    def head(self) -> tuple:
        """The arguments every kernel starts with."""
        return (self.x, self.a, self.b, self.row_ids, self.col_ids,
                self.n_rows, self.n_cols, self.d, self.sxr, self.sxc)

    @property
    def tl_acc(self):
        return tl_dtype(self.acc)


def _block_d(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(d, 1))))


def _scores_problem(scores: Tensor, img_ids: Tensor, cap_img_ids: Tensor) -> _Problem:
    s = scores.contiguous()
    return _Problem.build(s, s, s, img_ids.contiguous(), cap_img_ids.contiguous(),
                          s.shape[0], s.shape[1], 0, s.stride(0), s.stride(1), False)


def _embed_problem(img: Tensor, cap: Tensor, img_ids: Tensor, cap_img_ids: Tensor) -> _Problem:
    img, cap = img.contiguous(), cap.contiguous()
    return _Problem.build(img, img, cap, img_ids.contiguous(), cap_img_ids.contiguous(),
                          img.shape[0], cap.shape[0], img.shape[1], 0, 0, True)


def _margin(p: _Problem, margin: float) -> Tensor:
    # a device scalar in the accumulation dtype (a Python float argument would be fp32)
    return torch.full((1,), float(margin), dtype=p.acc, device=p.a.device)


def _hardest(p: _Problem, rows_too: bool = False) -> tuple[Tensor, ...]:
    """Per column of X: max over the negative rows (-inf if none) and its lowest argmax (-1 if none).

    rows_too: also per row (max over the negative columns, lowest argmax), from the same tiles: one
    pass over X instead of a second one over X^T, which halves the products of ``a @ b^T`` at the
    price of (column blocks, R) partials (8 bytes each), reduced here in torch (lowest index on ties).
    """
    device = p.a.device
    best = torch.empty(p.n_cols, dtype=p.acc, device=device)
    idx = torch.empty(p.n_cols, dtype=torch.int64, device=device)
    n_blocks = triton.cdiv(p.n_cols, BLOCK)
    part_max = torch.empty((n_blocks, p.n_rows) if rows_too else (0,), dtype=p.acc, device=device)
    part_idx = torch.empty(part_max.shape, dtype=torch.int32, device=device)
    _hardest_kernel[(n_blocks,)](
        *p.head, best, idx, part_max, part_idx,
        ACC=p.tl_acc, EMBED=p.embed, NATIVE_DOT=p.native_dot, PRECISION=p.precision, ROWS_TOO=rows_too,
        BLOCK_R=BLOCK, BLOCK_C=BLOCK, BLOCK_D=_block_d(p.d, BLOCK_D),
    )
    if not rows_too:
        return best, idx
    row_max = part_max.max(0).values
    # the lowest column among the blocks reaching the max (a row without negatives: every block -1)
    row_idx = torch.where(part_max == row_max, part_idx, p.n_cols).min(0).values.to(torch.int64)
    return best, idx, row_max, row_idx


def _terms(p: _Problem, margin: float, max_violation: bool) -> tuple[Tensor, Tensor, Tensor]:
    device = p.a.device
    if p.n_rows == 0 or p.n_cols == 0:
        return (
            torch.zeros(p.n_cols, dtype=p.acc, device=device),
            torch.full((p.n_rows,), -1, dtype=torch.int64, device=device),
            torch.full((p.n_cols,), -1, dtype=torch.int64, device=device),
        )
    if p.embed:  # compute-bound: one pass over the products gives both directions
        col_max, hard_img, row_max, hard_cap = _hardest(p, rows_too=True)
    else:  # memory-bound: a second read of the stored scores costs less than the partials
        row_max, hard_cap = _hardest(p.t())
        col_max, hard_img = _hardest(p)
    per_caption = torch.empty(p.n_cols, dtype=p.acc, device=device)
    _positive_kernel[(triton.cdiv(p.n_cols, BLOCK),)](
        *p.head, p.row_perm, p.col_lo, p.col_hi, row_max, hard_cap, col_max, hard_img,
        _margin(p, margin), per_caption, per_caption, per_caption, 0, 0,
        ACC=p.tl_acc, EMBED=p.embed, NATIVE_DOT=p.native_dot, PRECISION=p.precision,
        MAX_VIOLATION=bool(max_violation), GRAD=False,
        BLOCK_C=BLOCK, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(p.d, BLOCK_D), num_warps=LAYOUT_SAFE_WARPS,
    )
    return per_caption, hard_cap, hard_img


def _mv_weights(p: _Problem, hard: Tensor, margin_t: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """max_violation backward, per column of X: (gradient reaching its hardest negative, its max)."""
    weight = torch.empty(p.n_cols, dtype=p.acc, device=g.device)
    col_max = torch.empty(p.n_cols, dtype=p.acc, device=g.device)
    _mv_weight_kernel[(triton.cdiv(p.n_cols, BLOCK),)](
        *p.head, p.row_perm, p.col_lo, p.col_hi, hard.contiguous(), margin_t, g, weight, col_max,
        ACC=p.tl_acc, EMBED=p.embed, TRANSPOSED=p.transposed, BLOCK_C=BLOCK, BLOCK_D=_block_d(p.d, BLOCK_D),
        num_warps=LAYOUT_SAFE_WARPS,
    )
    return weight, col_max


def _inverse_lists(hard: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the preimages of ``hard``: the k with ``hard[k] == r`` are ``perm[lo[r]:hi[r]]``."""
    sorted_hard, perm = torch.sort(hard, stable=True)
    targets = torch.arange(n, device=hard.device, dtype=hard.dtype)
    return perm, torch.searchsorted(sorted_hard, targets), torch.searchsorted(sorted_hard, targets, right=True)


# ----------------------------------------------------------------------------- launchers
def forward(
    scores: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(per_caption (Nc,) acc dtype, hard_cap (Ni,) int64, hard_img (Nc,) int64) of the score matrix."""
    return _terms(_scores_problem(scores, img_ids, cap_img_ids), margin, max_violation)


def backward(
    grad_per_caption: Tensor,
    scores: Tensor,
    img_ids: Tensor,
    cap_img_ids: Tensor,
    hard_cap: Tensor,
    hard_img: Tensor,
    margin: float,
    max_violation: bool,
) -> Tensor:
    """Gradient of sum(grad_per_caption * per_caption) with respect to scores, in the dtype of scores."""
    p = _scores_problem(scores, img_ids, cap_img_ids)
    grad = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if grad.numel() == 0:
        return grad
    g = grad_per_caption.to(p.acc).contiguous()
    margin_t = _margin(p, margin)
    common = dict(ACC=p.tl_acc, BLOCK_R=BLOCK_GRAD_R, BLOCK_C=BLOCK, num_warps=LAYOUT_SAFE_WARPS)
    grid = (triton.cdiv(p.n_rows, BLOCK_GRAD_R), triton.cdiv(p.n_cols, BLOCK))
    lists = (p.col_perm, p.row_lo, p.row_hi, p.row_perm, p.col_lo, p.col_hi)
    if max_violation:
        col_weight, col_max = _mv_weights(p, hard_img, margin_t, g)
        row_weight, row_max = _mv_weights(p.t(), hard_cap, margin_t, g)
        _grad_scores_kernel[grid](
            *p.head, *lists, row_max, hard_cap.contiguous(), row_weight, col_max, hard_img.contiguous(), col_weight,
            margin_t, g, grad, grad.stride(0), grad.stride(1), MAX_VIOLATION=True, **common,
        )
        return grad
    # negatives tile by tile (positives written 0) ...
    _grad_scores_kernel[grid](
        *p.head, *lists, g, hard_cap, g, g, hard_img, g,
        margin_t, g, grad, grad.stride(0), grad.stride(1), MAX_VIOLATION=False, **common,
    )
    # ... then the positives, one program per block of captions
    _positive_kernel[(triton.cdiv(p.n_cols, BLOCK),)](
        *p.head, p.row_perm, p.col_lo, p.col_hi, g, hard_cap, g, hard_img,
        margin_t, g, g, grad, grad.stride(0), grad.stride(1),
        ACC=p.tl_acc, EMBED=False, NATIVE_DOT=p.native_dot, PRECISION=p.precision, MAX_VIOLATION=False, GRAD=True,
        BLOCK_C=BLOCK, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(p.d, BLOCK_D), num_warps=LAYOUT_SAFE_WARPS,
    )
    return grad


def embed_forward(
    img: Tensor, cap: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`forward` of ``S = img @ cap^T``, computed tile by tile and never stored."""
    return _terms(_embed_problem(img, cap, img_ids, cap_img_ids), margin, max_violation)


def embed_backward(
    grad_per_caption: Tensor,
    img: Tensor,
    cap: Tensor,
    img_ids: Tensor,
    cap_img_ids: Tensor,
    hard_cap: Tensor,
    hard_img: Tensor,
    margin: float,
    max_violation: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_img, grad_cap) in the dtypes of img and cap; the score gradient is never stored."""
    p = _embed_problem(img, cap, img_ids, cap_img_ids)
    grad_img = torch.empty(img.shape, dtype=img.dtype, device=img.device)
    grad_cap = torch.empty(cap.shape, dtype=cap.dtype, device=cap.device)
    if p.n_rows == 0 or p.n_cols == 0 or p.d == 0:
        return grad_img.zero_(), grad_cap.zero_()
    g = grad_per_caption.to(p.acc).contiguous()
    margin_t = _margin(p, margin)
    hard_cap, hard_img = hard_cap.contiguous(), hard_img.contiguous()
    if max_violation:
        col_weight, col_max = _mv_weights(p, hard_img, margin_t, g)
        row_weight, row_max = _mv_weights(p.t(), hard_cap, margin_t, g)
        img_side = (row_max, hard_cap, row_weight, col_max, hard_img, col_weight, *_inverse_lists(hard_img, p.n_rows))
        cap_side = (col_max, hard_img, col_weight, row_max, hard_cap, row_weight, *_inverse_lists(hard_cap, p.n_cols))
    else:
        img_side = cap_side = (g,) * 9  # unused
    # an fp32 / fp64 (BLOCK, BLOCK_DO) gradient tile holds twice the bytes of a 16-bit one's operands;
    # halving its columns kept it in the sm_90 register file (200 stack bytes at 128)
    halved = 2 if img.element_size() > 2 else 1
    for q, side, out in ((p, img_side, grad_img), (p.t(), cap_side, grad_cap)):
        block_do = _block_d(q.d, BLOCK_DO // halved)
        _embed_grad_kernel[(triton.cdiv(q.n_rows, BLOCK), triton.cdiv(q.d, block_do))](
            *q.head, q.col_perm, q.row_lo, q.row_hi, q.row_perm, q.col_lo, q.col_hi, *side,
            margin_t, g, out,
            ACC=q.tl_acc, NATIVE_DOT=q.native_dot, PRECISION=q.precision, MAX_VIOLATION=bool(max_violation),
            TRANSPOSED=q.transposed,
            BLOCK_R=BLOCK, BLOCK_C=BLOCK, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(q.d, BLOCK_D), BLOCK_DO=block_do,
            num_warps=LAYOUT_SAFE_WARPS,
        )
    return grad_img, grad_cap
