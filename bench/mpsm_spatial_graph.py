"""How much a trained MPSM's polar spatial graph depends on direction.

For each checkpoint, the graph's weight between a region at the image centre and one at distance
``r`` (normalised coordinates) is evaluated for 72 directions; the ratio of its largest to its
smallest value says how direction-selective the learnt kernels are (1.0: isotropic, the
initialisation). Also printed: how far the kernels' mixture logits and log-concentrations moved
from their initial values (0 and 0).

Usage: python bench/mpsm_spatial_graph.py RUN/best.pt [RUN/best.pt ...]
"""

from __future__ import annotations

import math
import sys

import torch

from sgfused.checkpoint import load_checkpoint, model_from_checkpoint


def direction_ratio(graph: torch.nn.Module, distance: float, directions: int = 72) -> float:
    """max / min over directions of the weight between two regions ``distance`` apart."""
    theta = torch.arange(directions) * (2 * math.pi / directions)
    centre = torch.tensor([0.5, 0.5, 0.5, 0.5]).expand(directions, 4)
    other = torch.stack([0.5 + distance * theta.cos(), 0.5 + distance * theta.sin()], 1).repeat(1, 2)
    with torch.no_grad():
        weight = graph(torch.stack([centre, other], 1))[:, 0, 1]
    return (weight.max() / weight.min()).item()


if __name__ == "__main__":
    for path in sys.argv[1:]:
        model, _ = model_from_checkpoint(load_checkpoint(path), None)
        graph = getattr(model, "spatial_graph", None)
        if graph is None:
            sys.exit(f"{path}: expected an MPSM checkpoint (a model with a polar spatial graph), got {type(model).__name__}")
        ratios = ", ".join(f"r={r}: {direction_ratio(graph, r):.3f}" for r in (0.1, 0.3, 0.5))
        print(f"{path}: weight max/min over directions {ratios}; |mixture| <= {graph.mixture.abs().max():.3f}, "
              f"|log concentration| <= {graph.angle_log_concentration.abs().max():.3f} (both start at 0)")
