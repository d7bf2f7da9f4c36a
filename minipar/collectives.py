"""Collectives built from point-to-point messages, to see what `all_reduce` costs.

Ring all-reduce (Patarasuk & Yuan 2009; the algorithm behind NCCL's ring and
Baidu's allreduce). Cut the tensor into N chunks. Each of 2(N-1) steps, every
rank sends one chunk to its right neighbour and receives one from its left:

  reduce-scatter phase (N-1 steps): step s sends chunk (r - s) mod N and adds the
      received chunk (r - s - 1) mod N into its own copy. Afterwards rank r holds
      the full sum of chunk (r + 1) mod N.
  all-gather phase (N-1 steps): step s sends chunk (r + 1 - s) mod N and
      overwrites chunk (r - s) mod N with the received one.

Bytes sent per rank: 2(N-1) chunks of S/N = 2(N-1)/N * S, independent of N for
large N: this is why ring all-reduce is bandwidth-optimal.
"""
from __future__ import annotations

import torch

from . import comm

__all__ = ["ring_all_reduce", "ring_neighbours"]


def ring_neighbours(group=None) -> tuple[int, int, int, int]:
    """(my index, world size, left neighbour, right neighbour) as global ranks."""
    import torch.distributed as dist
    pg, _, n = comm.resolve(group)
    r = comm.local_rank(group)
    ranks = dist.get_process_group_ranks(pg) if pg is not None else list(range(n))
    return r, n, ranks[(r - 1) % n], ranks[(r + 1) % n]


def ring_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `x` over the group with 2(N-1) neighbour exchanges; returns the result."""
    r, n, left, right = ring_neighbours(group)
    if n == 1:
        return x
    chunks = list(x.flatten().chunk(n))
    for s in range(n - 1):  # reduce-scatter phase
        send, recv_i = chunks[(r - s) % n], (r - s - 1) % n
        buf = torch.empty_like(chunks[recv_i])
        for h in comm.batch_p2p(sends=[(send, right)], recvs=[(buf, left)], group=group):
            h.wait()
        chunks[recv_i] = chunks[recv_i] + buf
    for s in range(n - 1):  # all-gather phase
        send, recv_i = chunks[(r + 1 - s) % n], (r - s) % n
        buf = torch.empty_like(chunks[recv_i])
        for h in comm.batch_p2p(sends=[(send, right)], recvs=[(buf, left)], group=group):
            h.wait()
        chunks[recv_i] = buf
    return torch.cat(chunks).view_as(x)
