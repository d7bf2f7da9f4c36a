"""Tree all-reduce: reduce up a binomial tree to rank 0, then broadcast back down the same tree
(Thakur, Rabenseifner & Gropp 2005, Sec. 4: MPICH's reduce + broadcast for short messages).

With L = ceil(log2 N) levels, at level k = 0, 1, ..., L-1 of the reduce the ranks whose index has
k as its lowest set bit send their whole partial result to index - 2^k, which adds it to its own:

    N = 8, reduce:  level 0: 1->0 3->2 5->4 7->6    level 1: 2->0 6->4    level 2: 4->0
    broadcast: the same edges, reversed, from level L-1 down to 0.

Rank 0 takes part in every level of both phases, so the critical path is 2L steps, each carrying
the whole tensor:                               α count 2·ceil(log2 N), β count 2·ceil(log2 N)·S

log2 N steps instead of the ring's 2(N-1): the tree wins while α dominates (small messages),
and loses once the bytes do, since every step moves all S bytes. NCCL's tree is the *double*
binary tree (Sanders, Speck & Träff 2009): two trees, each a leaf where the other is inner, each
reducing half of the tensor, pipelined in chunks, which brings the bytes back near the ring's 2S
at large sizes. This is the plain, unpipelined tree the α-β textbook counts.
"""

from __future__ import annotations

import torch

from .steps import exchange, group_ranks, reducer

__all__ = ["tree_all_reduce"]


def tree_all_reduce(x: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce `x` over the group on a binomial tree rooted at the group's first rank, then
    broadcast the result down the tree: 2·ceil(log2 N) steps. Returns the result (x is unchanged)."""
    me, ranks = group_ranks(group)
    n = len(ranks)
    if n == 1:
        return x
    reduce = reducer(op)
    acc = x.contiguous().clone()
    levels = (n - 1).bit_length()  # ceil(log2 N)
    for k in range(levels):  # reduce, leaves first
        half = 1 << k
        if me % (2 * half) == half:  # my lowest set bit is k: hand my sum up, done
            exchange(group, sends=[(acc, ranks[me - half])])
        elif me % (2 * half) == 0 and me + half < n:  # a child at distance 2^k
            buf = torch.empty_like(acc)
            exchange(group, recvs=[(buf, ranks[me + half])])
            acc = reduce(acc, buf)
    for k in reversed(range(levels)):  # broadcast, root first
        half = 1 << k
        if me % (2 * half) == 0 and me + half < n:
            exchange(group, sends=[(acc, ranks[me + half])])
        elif me % (2 * half) == half:
            exchange(group, recvs=[(acc, ranks[me - half])])
    return acc
