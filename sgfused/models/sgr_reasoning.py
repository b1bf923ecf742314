"""SGR graph reasoning over similarity nodes with a hand-written, memory-light backward.

SGRAF's similarity graph reasoning runs ``T`` steps on the nodes ``s`` of every
(caption, image) pair (``N`` nodes of ``m`` features, key mask ``valid``):

    E_t = softmax_j(q_i . s_j),  q = s A_t + c_t   (A_t = W_q^T W_k, c_t = b_q W_k)
    s  <- relu((E_t s) W_t^T + b_t)

and reads node 0 after the last step (which therefore only computes node 0).
Autograd would keep every step's ``(pairs, N, m)`` intermediates, several times
the nodes themselves; checkpointing the whole chain instead runs every forward
twice. :class:`SGRReasoning` keeps only the input nodes and each step's
attention ``E_t`` (``N x N`` per pair, small next to ``N x m``), rebuilds each
step's output from them with one matrix product (no edge logits, no softmax),
and runs the backward of every step by hand. It computes exactly the same
function as the plain PyTorch steps (``sgraf.GraphReasoning``), which the tests
compare it with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _attention(query: Tensor, nodes: Tensor, key_mask: Tensor) -> Tensor:
    """``softmax_j(query_i . nodes_j)`` over unmasked keys: ``(B, Q, m), (B, N, m) -> (B, Q, N)``."""
    logits = torch.bmm(query, nodes.transpose(1, 2))
    return torch.softmax(logits.masked_fill_(key_mask, float("-inf")), dim=-1)


def _step_output(edges: Tensor, nodes: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, relu(h W^T + b))`` with ``h = edges @ nodes``."""
    mixed = torch.bmm(edges, nodes)
    return mixed, F.linear(mixed, weight, bias).relu_()


def _queries(nodes: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """``nodes A + c``, the query side of the edge logits."""
    return torch.addmm(c, _rows(nodes), a).view(nodes.shape)


class SGRReasoning(torch.autograd.Function):
    """``apply(glob, local, key_mask, *params) -> node 0 after the last step, (B, m)``.

    The nodes are the global node ``glob (B, m)`` then the local ones ``local (B, N - 1, m)``;
    they are concatenated only for the duration of the forward and of the backward,
    so the saved nodes are the caller's tensors (SGRAF's similarity ops keep them
    anyway). ``key_mask (B, 1, N)`` is True where a node is padding (node 0 never
    is); ``params`` = ``(A_t, c_t, W_t, b_t)`` for every step, in order.
    """

    @staticmethod
    def forward(ctx: Any, glob: Tensor, local: Tensor, key_mask: Tensor, *params: Tensor) -> Tensor:
        steps = [params[i : i + 4] for i in range(0, len(params), 4)]
        s, edges = torch.cat([glob.unsqueeze(1), local], dim=1), []
        for a, c, w, b in steps[:-1]:
            edges.append(_attention(_queries(s, a, c), s, key_mask))
            s = _step_output(edges[-1], s, w, b)[1]
        a, c, w, b = steps[-1]
        edges.append(_attention(_queries(s[:, :1], a, c), s, key_mask))
        mixed, out = _step_output(edges[-1], s, w, b)
        ctx.save_for_backward(glob, local, mixed, out, *edges, *params)
        ctx.n_steps = len(steps)
        return out.squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        glob, local, mixed, out, *rest = ctx.saved_tensors
        edges, params = rest[: ctx.n_steps], rest[ctx.n_steps :]
        steps = [params[i : i + 4] for i in range(0, len(params), 4)]
        # rebuild the input of every step, and h = E s, from the saved attention (one product each)
        inputs, mixes = [torch.cat([glob.unsqueeze(1), local], dim=1)], []
        for (_, _, w, b), e in zip(steps[:-1], edges):
            h, s = _step_output(e, inputs[-1], w, b)
            mixes.append(h)
            inputs.append(s)
        mixes.append(mixed)

        grads: list[Tensor] = []
        grad_s = grad_out.unsqueeze(1)  # gradient of the last step's output (node 0 only)
        for t in range(ctx.n_steps - 1, -1, -1):  # each step's tensors are dropped once used
            (a, c, w, _), s, e, h = steps[t], inputs[t], edges[t], mixes.pop()
            last = t == ctx.n_steps - 1  # the last step updates node 0 only
            grad_pre = torch.ops.aten.threshold_backward(grad_s, out if last else inputs.pop(), 0)
            grad_w, grad_b = _rows(grad_pre).t() @ _rows(h), _rows(grad_pre).sum(0)
            grad_h = grad_pre @ w
            grad_logits = torch.ops.aten._softmax_backward_data(
                torch.bmm(grad_h, s.transpose(1, 2)), e, -1, e.dtype
            )
            queries = s[:, :1] if last else s
            grad_q = torch.bmm(grad_logits, s)
            grad_s = torch.bmm(e.transpose(1, 2), grad_h)  # through the values
            grad_s.baddbmm_(grad_logits.transpose(1, 2), _queries(queries, a, c))  # through the keys
            (grad_s[:, 0] if last else _rows(grad_s)).addmm_(_rows(grad_q), a.t())  # through the queries
            grad_a, grad_c = _rows(queries).t() @ _rows(grad_q), _rows(grad_q).sum(0)
            grads = [grad_a, grad_c, grad_w, grad_b] + grads
        return (grad_s[:, 0], grad_s[:, 1:], None, *grads)


def sgr_global_node(glob: Tensor, local: Tensor, valid: Tensor, steps: Sequence[Sequence[Tensor]]) -> Tensor:
    """Node 0 after the SGR steps, ``(C, I, m)``, of the nodes ``glob (C, I, m)`` then ``local (C, I, L, m)``.

    ``valid (C, 1, L + 1)`` is False on padding; ``steps`` holds each step's
    ``(A, c, W, b)`` (``GraphReasoning.edge_parameters``).
    """
    c, i, n, m = local.shape
    key_mask = (~valid).unsqueeze(-2).expand(c, i, 1, n + 1).reshape(c * i, 1, n + 1)
    params = [p for step in steps for p in step]
    return SGRReasoning.apply(glob.reshape(c * i, m), local.reshape(c * i, n, m), key_mask, *params).view(c, i, m)
