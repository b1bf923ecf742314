"""Graph layers shared by the scene-graph models: multi-head graph attention and neighbour means.

Scene graphs of a batch are held densely: node features ``(B, N, d)`` with a boolean
adjacency ``(B, N, N)`` (row ``i`` marks the neighbours node ``i`` reads from) or a
node-to-edge incidence ``(B, N, E)``. Dense masks keep every graph of a batch in one
tensor op (captions and images have tens of nodes, so the ``N x N`` masks are small)
and make padding explicit: a padded node or edge is a False / zero entry and never
reaches a valid node.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in ``module`` (the SCAN / GAT initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class GraphAttention(nn.Module):
    """Multi-head graph attention (GAT, Velickovic et al. 2018), heads averaged, ELU output.

    For node ``i`` with neighbours ``N_i`` (its adjacency row) and head ``k``:
    ``a^k_ij = softmax_{j in N_i} LeakyReLU(u_k . W_k h_i + v_k . W_k h_j)`` and the
    output is ``ELU(mean_k sum_j a^k_ij W_k h_j)``; every head maps ``d -> d`` (the
    averaging form GAT uses for its output layer).
    """

    def __init__(self, dim: int, heads: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.heads, self.negative_slope = heads, negative_slope
        self.proj = nn.Linear(dim, heads * dim, bias=False)
        self.att_target = nn.Parameter(torch.empty(heads, dim))
        self.att_source = nn.Parameter(torch.empty(heads, dim))
        xavier_init(self)
        nn.init.xavier_uniform_(self.att_target)
        nn.init.xavier_uniform_(self.att_source)

    def forward(self, nodes: Tensor, adjacency: Tensor) -> Tensor:
        """``nodes (B, N, d)``, ``adjacency (B, N, N)`` bool with at least one True per row -> ``(B, N, d)``."""
        b, n, d = nodes.shape
        if adjacency.shape != (b, n, n) or adjacency.dtype != torch.bool:
            raise ValueError(f"adjacency must be a bool tensor of shape {(b, n, n)}, got {adjacency.dtype} "
                             f"{tuple(adjacency.shape)}")
        h = self.proj(nodes).view(b, n, self.heads, d).transpose(1, 2)  # (B, K, N, d)
        target = (h * self.att_target[:, None]).sum(-1)  # (B, K, N)
        source = (h * self.att_source[:, None]).sum(-1)
        logits = F.leaky_relu(target.unsqueeze(-1) + source.unsqueeze(-2), self.negative_slope)  # (B, K, N, N)
        weights = torch.softmax(logits.masked_fill(~adjacency.unsqueeze(1), float("-inf")), dim=-1)
        return F.elu((weights @ h).mean(dim=1))


def neighbour_mean(incidence: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of the incident edge features of every node, and whether it has any.

    ``incidence (B, N, E)`` (1 where node and edge meet, 0 elsewhere, padded edges 0),
    ``features (B, E, d)`` -> ``(mean (B, N, d), has (B, N, 1) bool)``; a node with no
    incident edge gets a zero mean, never a division by zero.
    """
    counts = incidence.sum(dim=-1, keepdim=True)
    mean = (incidence @ features) / counts.clamp(min=1)
    return mean, counts > 0
