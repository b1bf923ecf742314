"""Triton kernels for batched region-word cross-attention over all pairs (docs/cross_attention_contract.md).

Semantics: docs/cross_attention_contract.md; ground truth: sgfused/reference/cross_attention.py.
The two launchers at the bottom are wrapped as ``torch.library.custom_op`` by sgfused.ops.

A program holds each of its pairs (a, b) whole: all Lq query positions and all Lc context positions,
padded to powers of two (BLOCK_J x BLOCK_C, at least 16 each for ``tl.dot``), with the feature
dimension d streamed in chunks of BLOCK_D. Loads are masked by the valid lengths, so padded
positions read as 0 and never influence a valid result.

* ``_forward_kernel``: one program per pair, or, with a W epilogue and 16-bit inputs, per GROUP pairs
  (a, b), (a, b + 1), ... of up to GROUP_ROWS query rows in all, whose context rows and query rows the
  program stacks so that every chunk of W it loads serves them all (W is the largest operand: at
  1000 x 5000 pairs, m = 256, d = 1024, reading it once per pair moves 2.6 TB through L2).
  ``s = Q_a C_b^T`` over d-chunks (BLOCK_J, BLOCK_C);
  leaky ReLU and the clipped l2 norm over the valid j (the program has them all); softmax over the
  valid k with temperature ``smooth``, kept in registers as P. Then d-chunk passes, each
  recomputing the chunk ``u = P C_b`` (cheap: Lq x Lc x BLOCK_D): pass 1 reduces ||u||, <u, q> and
  ||q||; pass 2 is the epilogue: ``context`` writes ``u / (||u|| + eps)``; ``cosine`` needs no pass
  2; ``distance`` / ``direction`` build the feature tile e (BLOCK_J, BLOCK_D) in registers and
  accumulate ``z += e W_chunk^T`` (BLOCK_J, BLOCK_M), then bias, l2norm, store. The
  (Nq, Nc, Lq, d) contexts are only written for ``context``; stats = (||z||, log-sum-exp).
* ``_backward_kernel``: recomputes each pair from the inputs and the log-sum-exp in ``stats``
  (P = exp(smooth s - lse); no probabilities or contexts are stored). Run twice: FOR_Q, one
  program per (query set a, split of the context sets) looping over its b in order, accumulating
  dQ_a (and the grad_bias partials of a, and writing each pair's rows of e and dz for grad_weight); and FOR_C, one program per (context set b,
  split of the query sets) looping over its a, accumulating dC_b. Every accumulator slice has a
  single owning program, which adds into it (load + store, in the accumulation dtype) once per
  partner in a fixed order; the launcher sums the splits with torch in a fixed order. The
  per-pair chain is: dz (distance / direction, z recomputed exactly) -> d-chunk pass for the
  direction l2norm terms -> d-chunk pass accumulating ``d_ctx C^T``, ``(u / ||u||) C^T`` and
  <u / ||u||, d_ctx> (which give ``dP = du C^T`` without forming du first; FOR_Q also adds the
  direct share ``d_q`` to dQ there, as it needs no dS) -> softmax, clipped-l2 and leaky-ReLU
  backward on the (BLOCK_J, BLOCK_C) tile -> d-chunk pass writing ``dQ += dS C`` (and the e rows)
  or ``dC += P^T du + dS^T Q``.
  grad_weight = sum over pairs of ``dz^T e`` is one GEMM (torch, tensor cores for 16-bit inputs) per
  launch of the FOR_Q kernel, over the e (pairs x Lq, d) and dz (pairs x Lq, m) rows its pairs wrote;
  the launches take as many query sets as keep each buffer within WEIGHT_ROWS_BYTES. (Adding each
  pair's ``dz^T e`` into an (m, d) slice of the program's own, as this kernel once did, read and wrote
  that slice once per pair: 2 MB per pair at m = 256, d = 1024, 32 GB for a 128 x 128 batch, which
  no cache holds; the rows are 160 KB per pair, written once and read once by the GEMM.)

Extra memory: backward only: fp32 / fp64 accumulators for dQ (split x Nq x Lq x d), dC
(split x Nc x Lc x d), and, with a weight, the e and dz rows (at most WEIGHT_ROWS_BYTES each) and
grad_bias partials (split x Nq x m). ``split`` is 1 in the interpreter and on CPU; on CUDA it grows until
about TARGET_PROGRAMS_CUDA programs run (bounded by the partner count).

Subgradients follow PyTorch autograd on the reference: leaky_relu'(0) = leaky, the norm of a zero
vector has gradient 0, clamp(min=eps) passes the gradient where the clamped value is >= eps.
Every ``v / (||v|| + eps)`` (z, u, the clipped-l2 columns, direction's ctx and q) is differentiated in
the projected form of ``_norm_grad``, which has no cancellation: where the true gradient is ~eps
(m = 1, a single valid query position under clipped_l2, d = 1) the kernels give it to working
precision, while the reference's autograd in fp32 gives rounding noise there (compare in fp64).

All elementwise arithmetic is in the accumulation dtype (fp32, fp64 for fp64 input). ``tl.dot`` runs
in full precision, or TF32 for fp32 inputs when the user allows it (``_common.dot_precision``). For
fp16 / bf16 inputs every contraction takes its operands in the input dtype with fp32 accumulation,
as flash attention does: the inputs as they are, and the fp32 intermediates that meet them (P, the
features e, the gradients dz, d_ctx, du, dS) rounded to nearest even in that dtype
(``_common.dot_operand``); on CUDA these run on the tensor cores, and in the interpreter the
same rounded values are multiplied in fp32, so the CPU tests see the GPU's rounding. It keeps the
16-bit kernels in registers (widening every tile to fp32 for CUDA-core products needed more than
255 registers per thread). No atomics; results are deterministic. Stores to bf16 round to nearest
even by hand (``cast_rounded``), as the interpreter's conversion truncates.

Limits: a pair must fit one program, so register use grows with next_pow2(Lq) x next_pow2(Lc) and
next_pow2(Lq) x next_pow2(m); meant for Lq, Lc up to about 128 and m up to 256 (larger sizes are
correct, but spill on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (acc_dtype, cast_rounded, dot_operand, dot_precision, keeps_fp32_operands, native_dot,
                      split_count, sum_partials, tl_dtype, widened)

BLOCK_D_FWD = 64  # d-chunk of the forward passes (halved for 4- and 8-byte inputs, and divided by GROUP)
BLOCK_D_BWD = 16  # d-chunk of the backward passes (more live tiles; at 32 the bf16 dQ pass spilled 96-208 B on sm_90)
TARGET_PROGRAMS_CUDA = 264  # backward splits the partner loop until about this many programs run
# the e and dz rows of the pairs of one dQ launch, each buffer at most this (see the module docstring)
WEIGHT_ROWS_BYTES = 64 << 20
GROUP_ROWS = 64  # a forward program with a W epilogue takes pairs (a, b), (a, b + 1), ... up to this many query rows
# Only 16-bit inputs are grouped: on sm_90 at SGRAF's sizes 2 bf16 pairs fit without spilling in Triton 3.6 and 3.9,
# 4 do not; 2 fp32 pairs at a d-chunk of 32 spilled 776-840 B, TF32 32 B in Triton 3.6.

EPILOGUES = {"context": 0, "cosine": 1, "distance": 2, "direction": 3}
NORMS = ("clipped_l2", "none")


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _operand_rows(ptr, base, rows, rmask, ds, dmask, D, ACC: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """ptr[base + rows[:, None] * D + ds[None, :]], 0 where masked, as a ``tl.dot`` operand (``widened``)."""
    ptrs = ptr + base + rows[:, None] * D + ds[None, :]
    return widened(tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0), ACC, NATIVE_DOT)


@triton.jit
def _rows(ptr, base, rows, rmask, ds, dmask, D, ACC: tl.constexpr):
    """The rows of ``_operand_rows`` in ACC, for elementwise arithmetic."""
    return _operand_rows(ptr, base, rows, rmask, ds, dmask, D, ACC, False)


@triton.jit
def _unit(v, n):
    """v / n row-wise ((R, K) by (R,)), 0 where n = 0 (then v = 0 too); exact +-1 when K = 1."""
    return v / tl.where(n > 0, n, 1.0)[:, None]


@triton.jit
def _norm_grad(dy, unit, proj, r, eps):
    """Gradient through y = v / r, r = ||v|| + eps, row-wise, given unit = v / ||v|| and proj = <unit, dy>.

    Written as the projection of dy off v plus the eps term, ``(dy - unit proj) / r + unit proj eps / r^2``,
    instead of ``dy / r - v <v, dy> / (r^2 ||v||)``: the same value, but without the cancellation that
    leaves rounding noise where the true gradient is ~eps (a single element, m = 1, Lq = 1, d = 1).
    A zero row (unit = 0) gets dy / r, as PyTorch's autograd gives the reference.
    """
    return (dy - unit * proj[:, None]) / r[:, None] + unit * (proj * eps / (r * r))[:, None]


@triton.jit
def _scores(q_ptr, c_ptr, qb, cb, js, jv, ks, kv, D,
            ACC: tl.constexpr, PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
            BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """s0[j, k] = <Q[a, j], C[b, k]> (BLOCK_J, BLOCK_C) in ACC, 0 at padded j or k."""
    s = tl.zeros((BLOCK_J, BLOCK_C), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        q = _operand_rows(q_ptr, qb, js, jv, ds, dm, D, ACC, NATIVE_DOT)
        ct = tl.trans(_operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT))
        s = tl.dot(q, ct, s, input_precision=PRECISION, out_dtype=ACC)
    return s


@triton.jit
def _logits(s0, jv, kv, smooth, leaky, eps, CLIPPED: tl.constexpr):
    """(t, r, x): t = leaky_relu(s0) (or s0), r[k] = ||t[valid j, k]||, x = smooth * s (-inf at padded k)."""
    if CLIPPED:
        t = tl.where(s0 > 0, s0, s0 * leaky)
        t = tl.where(jv[:, None], t, 0.0)
        r = tl.sqrt(tl.sum(t * t, axis=0))
        s = t / (r + eps)[None, :]
    else:
        t = s0
        r = tl.sum(s0 * 0.0, axis=0)
        s = s0
    x = tl.where(kv[None, :], smooth * s, float("-inf"))
    return t, r, x


@triton.jit
def _attend(p, c, ACC: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr, BLOCK_C: tl.constexpr):
    """u = P C_b for one d-chunk c of the context rows (a dot operand).

    GROUP == 1: p (BLOCK_J, BLOCK_C), c (BLOCK_C, BLOCK_D). GROUP > 1 pairs at once: p (GROUP, BLOCK_J,
    BLOCK_C), c the GROUP context sets' rows stacked (GROUP * BLOCK_C, BLOCK_D); u comes back with the
    pairs' query rows stacked the same way, (GROUP * BLOCK_J, BLOCK_D).
    """
    if GROUP == 1:
        u = tl.dot(p, c, input_precision=PRECISION, out_dtype=ACC)
    else:
        u3 = tl.dot(p, tl.reshape(c, (GROUP, BLOCK_C, c.shape[1])), input_precision=PRECISION, out_dtype=ACC)
        u = tl.reshape(u3, (GROUP * p.shape[1], c.shape[1]))
    return u


@triton.jit
def _softmax(x, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """(P as a dot operand for ``_attend``, log-sum-exp per stacked query row) of the logits x.

    x is (BLOCK_J, GROUP * BLOCK_C): GROUP pairs' columns side by side, each pair's softmax over its own
    BLOCK_C columns. The log-sum-exp rows are stacked pair by pair, (GROUP * BLOCK_J,).
    """
    if GROUP == 1:
        mx = tl.max(x, axis=1)
        ex = tl.exp(x - mx[:, None])
        se = tl.sum(ex, axis=1)
        p = dot_operand(ex / se[:, None], DOT, NATIVE_DOT)
        lse = mx + tl.log(se)
    else:
        x3 = tl.reshape(x, (BLOCK_J, GROUP, BLOCK_C))
        mx = tl.max(x3, axis=2)
        ex = tl.exp(x3 - mx[:, :, None])
        se = tl.sum(ex, axis=2)
        p = dot_operand(tl.permute(ex / se[:, :, None], (1, 0, 2)), DOT, NATIVE_DOT)
        lse = tl.reshape(tl.trans(mx + tl.log(se)), (GROUP * BLOCK_J,))
    return p, lse


@triton.jit
def _w_operand(v, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, WIDE: tl.constexpr):
    """e or dz as an operand of a product with W: ``dot_operand``, or with WIDE (fp16 distance, whose e
    passes fp16's range from |ctx - q| = 256) kept in fp32, the products then run as TF32."""
    if WIDE:
        v = v.to(tl.float32)
    else:
        v = dot_operand(v, DOT, NATIVE_DOT)
    return v


@triton.jit
def _w_rows(w_ptr, ms, mm, ds, dm, D, ACC: tl.constexpr, NATIVE_DOT: tl.constexpr, WIDE: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) chunk of W as a dot operand (in fp32 with WIDE, see ``_w_operand``)."""
    w = _operand_rows(w_ptr, 0, ms, mm, ds, dm, D, ACC, NATIVE_DOT)
    if WIDE:
        w = w.to(tl.float32)
    return w


@triton.jit
def _features(u, q, ru, rc, rq, EPI: tl.constexpr):
    """e = (ctx - q)^2 (distance) or l2norm(ctx) * l2norm(q) (direction), ctx = u / ru."""
    ctx = u / ru[:, None]
    if EPI == 2:
        diff = ctx - q
        e = diff * diff
    else:
        e = (ctx / rc[:, None]) * (q / rq[:, None])
    return e


@triton.jit
def _pass_norms(p, q_ptr, c_ptr, qb, cb, js, jv, ks, kv, D,
                ACC: tl.constexpr, PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row sums of u*u, u*q and q*q over d, with u = P C_b (BLOCK_J,) each; p is a dot operand.

    js / jv and ks / kv index the query and context rows (stacked pair by pair when GROUP > 1, see
    ``_attend``); BLOCK_J is the number of query rows."""
    uu = tl.zeros((BLOCK_J,), ACC)
    uq = tl.zeros((BLOCK_J,), ACC)
    qq = tl.zeros((BLOCK_J,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        c = _operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT)
        q = _rows(q_ptr, qb, js, jv, ds, dm, D, ACC)
        u = _attend(p, c, ACC, PRECISION, GROUP, BLOCK_C)
        uu += tl.sum(u * u, axis=1)
        uq += tl.sum(u * q, axis=1)
        qq += tl.sum(q * q, axis=1)
    return uu, uq, qq


@triton.jit
def _pass_project(p, q_ptr, c_ptr, w_ptr, bias_ptr, qb, cb, js, jv, ks, kv, ms, mm, D, ru, rc, rq,
                  ACC: tl.constexpr, DOT: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                  W_PRECISION: tl.constexpr, WIDE: tl.constexpr,
                  EPI: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = e W^T + bias (BLOCK_J, BLOCK_M), e built chunk by chunk in registers; p is a dot operand.

    Rows as in ``_pass_norms``: with GROUP pairs stacked, each W chunk is loaded once for all of them."""
    z = tl.zeros((BLOCK_J, BLOCK_M), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        c = _operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT)
        q = _rows(q_ptr, qb, js, jv, ds, dm, D, ACC)
        u = _attend(p, c, ACC, PRECISION, GROUP, BLOCK_C)
        e = _w_operand(_features(u, q, ru, rc, rq, EPI), DOT, NATIVE_DOT, WIDE)
        wt = tl.trans(_w_rows(w_ptr, ms, mm, ds, dm, D, ACC, NATIVE_DOT, WIDE))
        z = tl.dot(e, wt, z, input_precision=W_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + ms, mask=mm, other=0.0).to(ACC)[None, :]
    return z


@triton.jit
def _epilogue_grads(u, q, de, g, ru, rc, rq, nu, nq, k1, k2, k3, eps, EPI: tl.constexpr):
    """(d_ctx, d_q) of one d-chunk: the gradients reaching ctx = u / ru and q from the epilogue.

    context: g is the grad_out chunk. cosine: d_ctx = k1 q + k2 ctx, d_q = k1 ctx + k3 q.
    distance: de = dz W_chunk. direction: de = dz W_chunk; k2 = <u / ||u||, d l2norm(ctx)> and
    k3 = <q / ||q||, d l2norm(q)> (full-d sums), for the l2norm backward of ctx and q.
    """
    ctx = u / ru[:, None]
    if EPI == 0:
        d_ctx = g
        d_q = g * 0.0
    elif EPI == 1:
        d_ctx = k1[:, None] * q + k2[:, None] * ctx
        d_q = k1[:, None] * ctx + k3[:, None] * q
    elif EPI == 2:
        d_ctx = 2.0 * (ctx - q) * de
        d_q = -d_ctx
    else:
        cn = ctx / rc[:, None]
        qn = q / rq[:, None]
        d_ctx = _norm_grad(de * qn, _unit(u, nu), k2, rc, eps)
        d_q = _norm_grad(de * cn, _unit(q, nq), k3, rq, eps)
    return d_ctx, d_q


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(q_ptr, c_ptr, ql_ptr, cl_ptr, w_ptr, bias_ptr, prm_ptr, out_ptr, stats_ptr,
                    Nc, Lq, Lc, D, M,
                    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, CLIPPED: tl.constexpr,
                    EPI: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, GROUP: tl.constexpr,
                    W_PRECISION: tl.constexpr, WIDE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out and stats of the GROUP pairs (a, b0), ..., (a, b0 + GROUP - 1), all query positions.

    The pairs' context rows are stacked (column g * BLOCK_C + k of the score tile is position k of
    context set b0 + g) and so are their query rows (row g * BLOCK_J + j), so one pass over d serves
    them all and each chunk of W is loaded once per GROUP pairs. Members past Nc recompute pair
    (a, Nc - 1) and store nothing.
    """
    groups = tl.cdiv(Nc, GROUP)
    program = tl.program_id(0).to(tl.int64)
    a = program // groups
    b0 = (program % groups) * GROUP
    smooth = tl.load(prm_ptr)
    leaky = tl.load(prm_ptr + 1)
    eps = tl.load(prm_ptr + 2)
    lq = tl.minimum(tl.load(ql_ptr + a), Lq)
    js = tl.arange(0, BLOCK_J)
    jv = js < lq
    cs = tl.arange(0, GROUP * BLOCK_C)  # stacked context rows
    cset = tl.minimum(b0 + cs // BLOCK_C, Nc - 1)
    ks = cs % BLOCK_C
    kv = ks < tl.minimum(tl.load(cl_ptr + cset), Lc)
    crow = cset * Lc + ks  # row of contexts viewed as (Nc * Lc, d)
    rs = tl.arange(0, GROUP * BLOCK_J)  # stacked query rows
    rset = b0 + rs // BLOCK_J
    rj = rs % BLOCK_J
    rv = rj < lq
    rin = (rj < Lq) & (rset < Nc)
    qb = a * Lq * D
    row = (a * Nc + rset) * Lq + rj  # (a, b, j) as a row of out / stats

    s0 = _scores(q_ptr, c_ptr, qb, 0, js, jv, crow, kv, D, ACC, PRECISION, NATIVE_DOT, BLOCK_J, GROUP * BLOCK_C,
                 BLOCK_D)
    t, r, x = _logits(s0, jv, kv, smooth, leaky, eps, CLIPPED)
    p, lse = _softmax(x, DOT, NATIVE_DOT, GROUP, BLOCK_J, BLOCK_C)

    uu, uq, qq = _pass_norms(p, q_ptr, c_ptr, qb, 0, rj, rv, crow, kv, D, ACC, PRECISION, NATIVE_DOT, GROUP,
                             GROUP * BLOCK_J, BLOCK_C, BLOCK_D)
    nu = tl.sqrt(uu)
    ru = nu + eps
    nz = tl.zeros((GROUP * BLOCK_J,), ACC)
    if EPI == 0:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            c = _operand_rows(c_ptr, 0, crow, kv, ds, dm, D, ACC, NATIVE_DOT)
            u = _attend(p, c, ACC, PRECISION, GROUP, BLOCK_C)
            val = tl.where(rv[:, None], u / ru[:, None], 0.0)
            tl.store(out_ptr + row[:, None] * D + ds[None, :], cast_rounded(val, out_ptr.dtype.element_ty),
                     mask=rin[:, None] & dm[None, :])
    elif EPI == 1:
        nc = nu / ru
        nq = tl.sqrt(qq)
        val = (uq / ru) / tl.maximum(nc * nq, eps)
        val = tl.where(rv, val, 0.0)
        tl.store(out_ptr + row, cast_rounded(val, out_ptr.dtype.element_ty), mask=rin)
    else:
        rc = nu / ru + eps
        rq = tl.sqrt(qq) + eps
        ms = tl.arange(0, BLOCK_M)
        mm = ms < M
        z = _pass_project(p, q_ptr, c_ptr, w_ptr, bias_ptr, qb, 0, rj, rv, crow, kv, ms, mm, D, ru, rc, rq,
                          ACC, DOT, NATIVE_DOT, PRECISION, W_PRECISION, WIDE, EPI, HAS_BIAS, GROUP, GROUP * BLOCK_J,
                          BLOCK_C, BLOCK_M, BLOCK_D)
        nz = tl.sqrt(tl.sum(z * z, axis=1))
        val = tl.where(rv[:, None], z / (nz + eps)[:, None], 0.0)
        tl.store(out_ptr + row[:, None] * M + ms[None, :], cast_rounded(val, out_ptr.dtype.element_ty),
                 mask=rin[:, None] & mm[None, :])
    tl.store(stats_ptr + row * 2, tl.where(rv, nz, 0.0), mask=rin)
    tl.store(stats_ptr + row * 2 + 1, tl.where(rv, lse, 0.0), mask=rin)


@triton.jit
def _chunk_grads(p, dz, c_ptr, cb, ks, kv, q_ptr, qb, js, jv, g_ptr, row, w_ptr, ms, mm, ds, dm, D,
                 ru, rc, rq, nu, nq, k1, k2, k3, eps, EPI: tl.constexpr, ACC: tl.constexpr,
                 NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, W_PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """One d-chunk of the backward: context rows (a dot operand), query rows, u = p C, and the epilogue's
    gradients; p and dz are dot operands."""
    c = _operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT)
    q = _rows(q_ptr, qb, js, jv, ds, dm, D, ACC)
    u = tl.dot(p, c, input_precision=PRECISION, out_dtype=ACC)
    if EPI == 0:
        g = _rows(g_ptr, 0, row, jv, ds, dm, D, ACC)
    else:
        g = u
    if EPI >= 2:
        de = tl.dot(dz, _w_rows(w_ptr, ms, mm, ds, dm, D, ACC, NATIVE_DOT, WIDE), input_precision=W_PRECISION,
                    out_dtype=ACC)
    else:
        de = u
    d_ctx, d_q = _epilogue_grads(u, q, de, g, ru, rc, rq, nu, nq, k1, k2, k3, eps, EPI)
    return c, q, u, d_ctx, d_q


@triton.jit
def _backward_kernel(g_ptr, q_ptr, c_ptr, ql_ptr, cl_ptr, w_ptr, bias_ptr, prm_ptr, stats_ptr,
                     acc_ptr, e_ptr, dz_ptr, db_ptr,
                     Nq, Nc, Lq, Lc, D, M, partners_per_split, first,
                     ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, CLIPPED: tl.constexpr,
                     EPI: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, FOR_Q: tl.constexpr,
                     W_PRECISION: tl.constexpr, WIDE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """FOR_Q: acc[split, a] += dQ_a over the context sets b of the split, for the query sets a = first +
    program_id(0), and with a W epilogue the dbias partials of a and the rows of the grad_weight product:
    e and dz of pair (a, b) go to rows ((a - first) * Nc + b) * Lq + j of e_ptr (., d) and dz_ptr (., m), 0 at
    padded j. Otherwise (first = 0): acc[split, b] += dC_b over the query sets a of the split. acc is
    (split, N, L, d) in ACC."""
    me = first + tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    smooth = tl.load(prm_ptr)
    leaky = tl.load(prm_ptr + 1)
    eps = tl.load(prm_ptr + 2)
    js = tl.arange(0, BLOCK_J)
    ks = tl.arange(0, BLOCK_C)
    ms = tl.arange(0, BLOCK_M)
    mm = ms < M
    jin = js < Lq
    kin = ks < Lc
    if FOR_Q:
        n_mine = Nq
        n_partners = Nc
    else:
        n_mine = Nc
        n_partners = Nq
    start = split * partners_per_split
    end = tl.minimum(start + partners_per_split, n_partners)
    slot = split * n_mine + me  # this program's slice of acc / db
    db_acc = tl.zeros((BLOCK_M,), ACC)
    for other in range(start, end):
        if FOR_Q:
            a = me
            b = other
        else:
            a = other
            b = me
        lq = tl.minimum(tl.load(ql_ptr + a), Lq)
        lc = tl.minimum(tl.load(cl_ptr + b), Lc)
        jv = js < lq
        kv = ks < lc
        pm = jv[:, None] & kv[None, :]
        qb = a * Lq * D
        cb = b * Lc * D
        row = (a * Nc + b) * Lq + js
        zrows = ((a - first) * Nc + b) * Lq + js  # the pair's rows of e_ptr / dz_ptr (FOR_Q)

        # ---- recompute the attention (P from the saved log-sum-exp)
        s0 = _scores(q_ptr, c_ptr, qb, cb, js, jv, ks, kv, D, ACC, PRECISION, NATIVE_DOT, BLOCK_J, BLOCK_C, BLOCK_D)
        t, r, x = _logits(s0, jv, kv, smooth, leaky, eps, CLIPPED)
        lse = tl.load(stats_ptr + row * 2 + 1, mask=jv, other=0.0).to(ACC)
        p = tl.where(pm, tl.exp(x - lse[:, None]), 0.0)
        pd = dot_operand(p, DOT, NATIVE_DOT)
        uu, uq, qq = _pass_norms(pd, q_ptr, c_ptr, qb, cb, js, jv, ks, kv, D, ACC, PRECISION, NATIVE_DOT, 1,
                                 BLOCK_J, BLOCK_C, BLOCK_D)
        nu = tl.sqrt(uu)
        ru = nu + eps
        nc = nu / ru
        rc = nc + eps
        nq = tl.sqrt(qq)
        rq = nq + eps

        # ---- per-row epilogue terms
        k1 = tl.zeros((BLOCK_J,), ACC)
        k2 = tl.zeros((BLOCK_J,), ACC)
        k3 = tl.zeros((BLOCK_J,), ACC)
        dz = tl.zeros((BLOCK_J, BLOCK_M), ACC)
        if EPI == 1:
            gc = tl.load(g_ptr + row, mask=jv, other=0.0).to(ACC)
            dot = uq / ru
            den = nc * nq
            dd = tl.maximum(den, eps)
            k1 = gc / dd  # d out / d dot
            d_den = tl.where(den >= eps, -gc * dot / (dd * dd), 0.0)
            k2 = tl.where(nc > 0, d_den * nq / tl.where(nc > 0, nc, 1.0), 0.0)  # through ||ctx||
            k3 = tl.where(nq > 0, d_den * nc / tl.where(nq > 0, nq, 1.0), 0.0)  # through ||q||
        if EPI >= 2:
            z = _pass_project(pd, q_ptr, c_ptr, w_ptr, bias_ptr, qb, cb, js, jv, ks, kv, ms, mm, D, ru, rc, rq,
                              ACC, DOT, NATIVE_DOT, PRECISION, W_PRECISION, WIDE, EPI, HAS_BIAS, 1, BLOCK_J, BLOCK_C,
                              BLOCK_M, BLOCK_D)
            gz = tl.load(g_ptr + row[:, None] * M + ms[None, :], mask=jv[:, None] & mm[None, :], other=0.0).to(ACC)
            nz = tl.sqrt(tl.sum(z * z, axis=1))
            rz = nz + eps
            zu = _unit(z, nz)
            dz = _norm_grad(gz, zu, tl.sum(zu * gz, axis=1), rz, eps)
            db_acc += tl.sum(dz, axis=0)
        dzd = _w_operand(dz, DOT, NATIVE_DOT, WIDE)
        if FOR_Q:
            if EPI >= 2:
                tl.store(dz_ptr + zrows[:, None] * M + ms[None, :],
                         tl.where(jv[:, None], dzd, 0.0).to(dz_ptr.dtype.element_ty), mask=jin[:, None] & mm[None, :])
        if EPI == 3:
            # <u / ||u||, d l2norm(ctx)> and <q / ||q||, d l2norm(q)> for the l2norm backward of both
            k2 = tl.zeros((BLOCK_J,), ACC)
            k3 = tl.zeros((BLOCK_J,), ACC)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dm = ds < D
                c = _operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT)
                q = _rows(q_ptr, qb, js, jv, ds, dm, D, ACC)
                w = _operand_rows(w_ptr, 0, ms, mm, ds, dm, D, ACC, NATIVE_DOT)
                u = tl.dot(pd, c, input_precision=PRECISION, out_dtype=ACC)
                de = tl.dot(dzd, w, input_precision=PRECISION, out_dtype=ACC)
                k2 += tl.sum(_unit(u, nu) * de * (q / rq[:, None]), axis=1)
                k3 += tl.sum(_unit(q, nq) * de * ((u / ru[:, None]) / rc[:, None]), axis=1)

        # ---- dP = du C^T, du = (d_ctx - uu a) / ru + uu a eps / ru^2 (uu = u / ||u||, a = <uu, d_ctx>),
        #      from d1 = d_ctx C^T, d2 = uu C^T and a, so du is not needed before a is known
        d1 = tl.zeros((BLOCK_J, BLOCK_C), ACC)
        d2 = tl.zeros((BLOCK_J, BLOCK_C), ACC)
        a_u = tl.zeros((BLOCK_J,), ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            c, q, u, d_ctx, d_q = _chunk_grads(pd, dzd, c_ptr, cb, ks, kv, q_ptr, qb, js, jv, g_ptr, row, w_ptr, ms,
                                               mm, ds, dm, D, ru, rc, rq, nu, nq, k1, k2, k3, eps, EPI, ACC,
                                               NATIVE_DOT, PRECISION, W_PRECISION, WIDE)
            ct = tl.trans(c)
            uu_ = _unit(u, nu)
            d1 = tl.dot(dot_operand(d_ctx, DOT, NATIVE_DOT), ct, d1, input_precision=PRECISION, out_dtype=ACC)
            d2 = tl.dot(dot_operand(uu_, DOT, NATIVE_DOT), ct, d2, input_precision=PRECISION, out_dtype=ACC)
            a_u += tl.sum(uu_ * d_ctx, axis=1)
            if FOR_Q:
                if EPI >= 1:  # the query's direct share needs no dS: added here, so the last pass needs no dE
                    ptrs = acc_ptr + (slot * Lq + js[:, None]) * D + ds[None, :]
                    msk = jin[:, None] & dm[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + d_q, mask=msk)
        dp = (d1 - d2 * a_u[:, None]) / ru[:, None] + d2 * (a_u * eps / (ru * ru))[:, None]

        # ---- softmax, clipped l2 and leaky ReLU backward on the (j, k) tile
        dx = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dsc = smooth * dx
        if CLIPPED:
            # the norm runs over j (axis 0): _norm_grad on the transposed tile
            tu = _unit(tl.trans(t), r)
            dsct = tl.trans(dsc)
            dt = tl.trans(_norm_grad(dsct, tu, tl.sum(tu * dsct, axis=1), r + eps, eps))
            ds0 = tl.where(s0 > 0, dt, dt * leaky)
        else:
            ds0 = dsc
        ds0 = dot_operand(tl.where(pm, ds0, 0.0), DOT, NATIVE_DOT)

        # ---- accumulate this pair's share of the outputs, one d-chunk at a time
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            if FOR_Q:
                c = _operand_rows(c_ptr, cb, ks, kv, ds, dm, D, ACC, NATIVE_DOT)
                val = tl.dot(ds0, c, input_precision=PRECISION, out_dtype=ACC)
                ptrs = acc_ptr + (slot * Lq + js[:, None]) * D + ds[None, :]
                msk = jin[:, None] & dm[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + val, mask=msk)
                if EPI >= 2:  # the rows of grad_weight = sum dz^T e, which the launcher multiplies out
                    q = _rows(q_ptr, qb, js, jv, ds, dm, D, ACC)
                    u = tl.dot(pd, c, input_precision=PRECISION, out_dtype=ACC)
                    e = _w_operand(_features(u, q, ru, rc, rq, EPI), DOT, NATIVE_DOT, WIDE)
                    tl.store(e_ptr + zrows[:, None] * D + ds[None, :],
                             tl.where(jv[:, None], e, 0.0).to(e_ptr.dtype.element_ty), mask=msk)
            else:
                c, q, u, d_ctx, d_q = _chunk_grads(pd, dzd, c_ptr, cb, ks, kv, q_ptr, qb, js, jv, g_ptr, row, w_ptr,
                                                   ms, mm, ds, dm, D, ru, rc, rq, nu, nq, k1, k2, k3, eps, EPI, ACC,
                                                   NATIVE_DOT, PRECISION, W_PRECISION, WIDE)
                du = dot_operand(_norm_grad(d_ctx, _unit(u, nu), a_u, ru, eps), DOT, NATIVE_DOT)
                val = tl.dot(tl.trans(pd), du, input_precision=PRECISION, out_dtype=ACC)
                val = tl.dot(tl.trans(ds0), dot_operand(q, DOT, NATIVE_DOT), val, input_precision=PRECISION,
                             out_dtype=ACC)
                ptrs = acc_ptr + (slot * Lc + ks[:, None]) * D + ds[None, :]
                msk = kin[:, None] & dm[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + val, mask=msk)
    if FOR_Q:
        if HAS_BIAS:
            tl.store(db_ptr + slot * M + ms, db_acc, mask=mm)


# ----------------------------------------------------------------------------- launch helpers
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


class _Setup:
    """Contiguous inputs, shapes, block sizes and the kernels' common constexprs."""

    def __init__(self, queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue,
                 weight, bias, eps):
        if norm not in NORMS:
            raise ValueError(f"cross_attention: norm must be one of {NORMS}, got {norm!r}")
        if epilogue not in EPILOGUES:
            raise ValueError(f"cross_attention: epilogue must be one of {tuple(EPILOGUES)}, got {epilogue!r}")
        self.epi = EPILOGUES[epilogue]
        self.clipped = norm == "clipped_l2"
        if self.epi >= 2 and weight is None:
            raise ValueError(f"cross_attention: epilogue {epilogue!r} needs a weight")
        self.q, self.c = queries.contiguous(), contexts.contiguous()
        self.ql = query_lens.to(device=queries.device, dtype=torch.int64).contiguous()
        self.cl = context_lens.to(device=queries.device, dtype=torch.int64).contiguous()
        self.nq, self.lq, self.d = self.q.shape
        self.nc, self.lc = self.c.shape[0], self.c.shape[1]
        self.uses_w = self.epi >= 2
        self.w = weight.contiguous() if (self.uses_w and weight is not None) else None
        self.bias = bias.contiguous() if (self.uses_w and bias is not None) else None
        self.m = self.w.shape[0] if self.w is not None else 0
        self.dtype = queries.dtype
        self.acc = acc_dtype(queries.dtype)
        self.device = queries.device
        # (smooth, leaky, eps) on the device in the accumulation dtype (a Python float argument would be
        # fp32); filled in place rather than copied from the host, so there is no synchronisation
        self.params = torch.full((3,), float(eps), dtype=self.acc, device=self.device)
        self.params[0:1].fill_(float(smooth))
        self.params[1:2].fill_(float(leaky))
        self.block_j = _pow2(self.lq)
        self.block_c = _pow2(self.lc)
        self.block_m = _pow2(self.m)
        # pairs per forward program: with W (distance / direction) and 16-bit inputs several share each W
        # chunk they load (GROUP_ROWS)
        self.wide = keeps_fp32_operands(self.dtype, self.epi == 2)  # e, dz and W meet in fp32 (TF32 products)
        grouped = self.uses_w and self.dtype.itemsize == 2 and not self.wide
        self.group = max(1, min(GROUP_ROWS // self.block_j, _pow2(self.nc, 1))) if grouped else 1
        self.native_dot = native_dot(self.dtype, self.device)  # fp16 / bf16 contractions on the tensor cores
        self.precision = dot_precision(self.dtype)

    def const(self, block_d: int, group: int = 1) -> dict:
        """The constexprs and launch options of a kernel whose programs take ``group`` pairs at once.

        The d-chunk is ``block_d`` for 16-bit inputs, halved for 4- and 8-byte ones and divided by the
        group, so the (group * BLOCK_J, BLOCK_D) tiles keep their size in bytes (wider ones spilled on sm_90),
        and at least 16, ``tl.dot``'s smallest inner dimension.
        """
        tiles = max(self.block_j * self.block_c, self.block_j * self.block_m) * group
        block_d = max(16, block_d // (2 if self.dtype.itemsize > 2 or self.wide else 1) // group)
        return dict(
            ACC=tl_dtype(self.acc), DOT=tl_dtype(self.dtype), PRECISION=self.precision, CLIPPED=self.clipped, EPI=self.epi,
            HAS_BIAS=self.bias is not None,
            NATIVE_DOT=self.native_dot, W_PRECISION="tf32" if self.wide else self.precision, WIDE=self.wide,
            BLOCK_J=self.block_j, BLOCK_C=self.block_c,
            BLOCK_D=min(block_d, _pow2(self.d)), BLOCK_M=self.block_m, num_warps=8 if tiles >= 8192 else 4,
        )

    @property
    def out_shape(self) -> tuple:
        head = (self.nq, self.nc, self.lq)
        if self.epi == 0:
            return head + (self.d,)
        if self.epi == 1:
            return head
        return head + (self.m,)

    def ptrs(self) -> tuple:
        """(w, bias) arguments; unused ones point at the queries (never read)."""
        w = self.w if self.w is not None else self.q
        return w, (self.bias if self.bias is not None else w)


def _product(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b in ``acc``: fp16 / bf16 operands on the tensor cores with fp32 output (CUDA's out_dtype form),
    others as torch.matmul multiplies them (so fp32 follows the user's TF32 setting, as the kernels do)."""
    # the out_dtype form refuses fp16 while torch asks for fp16 accumulation, which this op never does
    fp16_refused = a.dtype == torch.float16 and torch.backends.cuda.matmul.allow_fp16_accumulation
    if a.dtype != acc and a.is_cuda and not fp16_refused:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


def _splits(n_mine: int, n_partners: int, device: torch.device) -> int:
    """Splits of the partner loop: one in the interpreter, about TARGET_PROGRAMS_CUDA programs on CUDA."""
    return split_count(n_partners, n_mine, TARGET_PROGRAMS_CUDA if device.type == "cuda" else 0)


# ----------------------------------------------------------------------------- launchers
def forward(
    queries: Tensor,
    contexts: Tensor,
    query_lens: Tensor,
    context_lens: Tensor,
    smooth: float,
    leaky: float,
    norm: str,
    epilogue: str,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(out in the input dtype, stats (Nq, Nc, Lq, 2) in the accumulation dtype); see the contract."""
    s = _Setup(queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps)
    out = torch.empty(s.out_shape, dtype=s.dtype, device=s.device)
    stats = torch.empty((s.nq, s.nc, s.lq, 2), dtype=s.acc, device=s.device)
    if out.numel() == 0 and stats.numel() == 0:
        return out, stats
    if s.d == 0 or s.lc == 0:
        raise ValueError("cross_attention: d and Lc must be positive")
    w, b = s.ptrs()
    _forward_kernel[(s.nq * triton.cdiv(s.nc, s.group),)](
        s.q, s.c, s.ql, s.cl, w, b, s.params, out, stats,
        s.nc, s.lq, s.lc, s.d, max(s.m, 1),
        GROUP=s.group, **s.const(BLOCK_D_FWD, s.group),
    )
    return out, stats


def backward(
    grad_out: Tensor,
    queries: Tensor,
    contexts: Tensor,
    query_lens: Tensor,
    context_lens: Tensor,
    smooth: float,
    leaky: float,
    norm: str,
    epilogue: str,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out: Tensor,
    stats: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_queries, grad_contexts, grad_weight, grad_bias) in their inputs' dtypes.

    grad_weight / grad_bias are empty (0,) tensors when weight / bias are None. Reads the
    log-sum-exp in ``stats[..., 1]``; z is recomputed from the inputs, so ``out`` and
    ``stats[..., 0]`` are not read.
    """
    s = _Setup(queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps)
    device, acc = s.device, s.acc
    g = grad_out.contiguous()
    st = stats.to(acc).contiguous()
    empty_w = torch.empty((0,), dtype=weight.dtype if weight is not None else s.dtype, device=device)
    empty_b = torch.empty((0,), dtype=bias.dtype if bias is not None else s.dtype, device=device)
    n_pairs = s.nq * s.nc
    if n_pairs == 0 or s.lq == 0 or s.d == 0:
        gw = torch.zeros_like(weight) if weight is not None else empty_w
        gb = torch.zeros_like(bias) if bias is not None else empty_b
        return torch.zeros_like(queries), torch.zeros_like(contexts), gw, gb
    w, b = s.ptrs()
    const = s.const(BLOCK_D_BWD)

    # dQ (and the bias partials, and the rows of the weight's product): programs per (a, split of b), over
    # launches of `block` query sets a; with a weight each launch writes its pairs' e and dz rows and
    # grad_weight += dz^T e is one GEMM per launch
    row_dtype = s.dtype if s.native_dot and not s.wide else acc  # e and dz as the kernels' dot operands hold them
    block = s.nq
    if s.uses_w:
        per_a = s.nc * s.lq * max(s.d, s.m) * row_dtype.itemsize
        block = max(1, min(s.nq, WEIGHT_ROWS_BYTES // per_a))
    split_q = _splits(block, s.nc, device)
    per_q = triton.cdiv(s.nc, split_q)
    split_q = triton.cdiv(s.nc, per_q)
    dq = torch.zeros((split_q, s.nq, s.lq, s.d), dtype=acc, device=device)
    if s.uses_w:
        gw = torch.zeros((s.m, s.d), dtype=acc, device=device)
        db = torch.zeros((split_q, s.nq, s.m), dtype=acc, device=device)
        e_rows = torch.empty((block * s.nc * s.lq, s.d), dtype=row_dtype, device=device)
        dz_rows = torch.empty((block * s.nc * s.lq, s.m), dtype=row_dtype, device=device)
    else:
        db = e_rows = dz_rows = dq
    for first in range(0, s.nq, block):
        count = min(block, s.nq - first)
        _backward_kernel[(count, split_q)](
            g, s.q, s.c, s.ql, s.cl, w, b, s.params, st, dq, e_rows, dz_rows, db,
            s.nq, s.nc, s.lq, s.lc, s.d, max(s.m, 1), per_q, first,
            FOR_Q=True, **const,
        )
        if s.uses_w:
            rows = count * s.nc * s.lq
            gw += _product(dz_rows[:rows].t(), e_rows[:rows], acc)

    # dC: programs per (b, split of a)
    split_c = _splits(s.nc, s.nq, device)
    per_c = triton.cdiv(s.nq, split_c)
    split_c = triton.cdiv(s.nq, per_c)
    dc = torch.zeros((split_c, s.nc, s.lc, s.d), dtype=acc, device=device)
    _backward_kernel[(s.nc, split_c)](
        g, s.q, s.c, s.ql, s.cl, w, b, s.params, st, dc, dc, dc, dc,
        s.nq, s.nc, s.lq, s.lc, s.d, max(s.m, 1), per_c, 0,
        FOR_Q=False, **const,
    )

    grad_q = sum_partials(dq).to(queries.dtype)
    grad_c = sum_partials(dc).to(contexts.dtype)
    if weight is not None and s.uses_w:
        grad_w = gw.to(weight.dtype)
    elif weight is not None:
        grad_w = torch.zeros_like(weight)
    else:
        grad_w = empty_w
    if bias is not None and s.uses_w:
        grad_b = db.sum((0, 1)).to(bias.dtype)
    elif bias is not None:
        grad_b = torch.zeros_like(bias)
    else:
        grad_b = empty_b
    return grad_q, grad_c, grad_w, grad_b
