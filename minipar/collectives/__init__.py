"""Collectives built from point-to-point messages, to see what each algorithm costs.

Every algorithm here is a sequence of *steps* (see `steps`): each rank posts its sends and
receives of the step through `minipar.comm`, so the trace holds every byte, and `cost` measures
the steps and bytes on the critical path from that trace alone. Their α-β counts (Thakur,
Rabenseifner & Gropp 2005) are `cost.alpha_beta`; the planner prices collectives with it.

    module              algorithm                                      wins when
    ring                ring reduce-scatter / all-gather / all-reduce  large messages (bandwidth-optimal)
    tree                binomial-tree reduce + broadcast               small messages (log N steps)
    halving_doubling    Rabenseifner's recursive halving + doubling    both, when N is a power of two
    hierarchical        reduce-scatter in node, all-reduce across,     nodes of fast links joined
                        all-gather in node                             by slower NICs
    pairwise            pairwise-exchange all-to-all                   (the all-to-all of EP, Ulysses)

NCCL picks among ring, tree (a pipelined double binary tree) and, on NVSwitch and SHARP fabrics,
in-network reductions by message size and topology; the α-β model is how to reason about that choice.
"""

from .cost import (
    ALGORITHMS,
    OPS_OF,
    alpha_beta,
    chunks,
    collective_time,
    critical_path,
    hierarchical_alpha_beta,
    padded_numel,
    traffic,
)
from .halving_doubling import halving_doubling_all_reduce
from .hierarchical import INTER_ALGORITHMS, hierarchical_all_reduce
from .pairwise import pairwise_all_to_all
from .ring import ring_all_gather, ring_all_reduce, ring_neighbours, ring_reduce_scatter
from .tree import tree_all_reduce

__all__ = [
    "ring_neighbours",
    "ring_reduce_scatter",
    "ring_all_gather",
    "ring_all_reduce",
    "tree_all_reduce",
    "halving_doubling_all_reduce",
    "hierarchical_all_reduce",
    "pairwise_all_to_all",
    "INTER_ALGORITHMS",
    "ALGORITHMS",
    "OPS_OF",
    "alpha_beta",
    "hierarchical_alpha_beta",
    "chunks",
    "padded_numel",
    "collective_time",
    "critical_path",
    "traffic",
]
