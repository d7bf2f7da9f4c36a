"""Hierarchical all-reduce: use the fast links inside a node and the slow ones across nodes only
for what must cross (Jia et al. 2018 for the 2D form; what Horovod's hierarchical allreduce and
NCCL's tree and NVLS+IB algorithms do with NVLink and the NIC).

With A ranks per node (`intra`, e.g. the 8 GPUs on NVLink) and B nodes (`inter`, one rank per node
with the same local index, on the NIC):

  1. reduce-scatter inside the node (ring): rank a of the node holds the node's sum of slice a, S/A bytes;
  2. all-reduce across nodes of that slice only (ring, tree or halving-doubling): the B ranks
     holding slice a sum it over the nodes; the A slices of a node cross in parallel, one per NIC;
  3. all-gather inside the node (ring): every rank gets every reduced slice.

On the node's links:  α count 2(A-1),  β count 2(A-1)/A · S            (steps 1 and 3)
Across nodes:         the chosen algorithm's counts on N = B and S/A   (step 2)

A flat ring over all A·B ranks would send 2(AB-1)/(AB) · S per rank over its slowest link; the
hierarchy sends only 2(B-1)/B · S/A over the NIC, A times less, and pays 2(A-1) + 2(B-1) steps
instead of 2(AB-1). `cost.hierarchical_alpha_beta` gives both pairs.
"""

from __future__ import annotations

import torch

from ..validation import Problems
from .cost import chunks
from .halving_doubling import halving_doubling_all_reduce
from .ring import ring_all_gather, ring_all_reduce, ring_reduce_scatter
from .steps import group_ranks, pad_to
from .tree import tree_all_reduce

__all__ = ["hierarchical_all_reduce", "INTER_ALGORITHMS"]

INTER_ALGORITHMS = {
    "ring": ring_all_reduce,
    "tree": tree_all_reduce,
    "halving_doubling": halving_doubling_all_reduce,
}


def hierarchical_all_reduce(
    x: torch.Tensor, intra, inter, inter_algorithm: str = "ring", op: str = "sum"
) -> torch.Tensor:
    """Reduce `x` over intra x inter: reduce-scatter in `intra`, all-reduce in `inter` with
    `inter_algorithm`, all-gather in `intra`. Returns the result (x is unchanged)."""
    p = Problems()
    p.choice("inter_algorithm", inter_algorithm, INTER_ALGORITHMS)
    p.raise_if_any("hierarchical all-reduce cannot run")
    a, b = len(group_ranks(intra)[1]), len(group_ranks(inter)[1])
    flat = pad_to(x.flatten(), a * chunks(inter_algorithm, b))  # A slices, each cut evenly across nodes
    mine = ring_reduce_scatter(flat, intra, op)  # 1. the node's sum of my slice
    mine = INTER_ALGORITHMS[inter_algorithm](mine, inter, op)  # 2. ... summed over the nodes
    return ring_all_gather(mine, intra)[: x.numel()].view_as(x)  # 3. every slice, on every rank
