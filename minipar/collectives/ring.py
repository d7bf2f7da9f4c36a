"""Ring collectives: every rank talks only to its two neighbours (Patarasuk & Yuan 2009,
"Bandwidth optimal all-reduce algorithms"; the algorithm behind NCCL's rings and Baidu's allreduce).

Rank r of N sends to r+1 and receives from r-1 (mod N). A tensor of S bytes is cut into N chunks
of S/N, and every step moves one chunk per rank:

  reduce-scatter (N-1 steps): step s sends the partial sum of chunk (r-s-1) mod N and adds the
      chunk (r-s-2) mod N arriving from the left into its own. After N-1 steps rank r holds the
      full sum of chunk r.                                  α count N-1, β count (N-1)/N · S_in
  all-gather (N-1 steps): step s forwards the block (r-s) mod N that arrived one step earlier
      (its own block first).                                α count N-1, β count (N-1)/N · S_out
  all-reduce = reduce-scatter, then all-gather of the reduced chunks.
                                                            α count 2(N-1), β count 2(N-1)/N · S

The β count 2(N-1)/N · S approaches 2S however many ranks there are: no algorithm sends less
(each rank must send its S and receive the others' contributions), which is why the ring is
bandwidth-optimal. Its α count grows with N: for small messages a tree wins (see `cost`).
A tensor whose element count does not divide by N is zero-padded to the next multiple, so that
every chunk (and every message) has the same size; the counts hold for the padded size.
"""

from __future__ import annotations

import torch

from ..validation import ConfigError
from .steps import exchange, group_ranks, pad_to, reducer

__all__ = ["ring_neighbours", "ring_reduce_scatter", "ring_all_gather", "ring_all_reduce"]


def ring_neighbours(group=None) -> tuple[int, int, int, int]:
    """(my index, world size, left neighbour, right neighbour) as global ranks."""
    r, ranks = group_ranks(group)
    n = len(ranks)
    return r, n, ranks[(r - 1) % n], ranks[(r + 1) % n]


def ring_reduce_scatter(x: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce every rank's `x` and keep block r of dim 0 (like `comm.reduce_scatter`): N-1 steps."""
    r, n, left, right = ring_neighbours(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ConfigError(
            [
                f"dim 0 of size {x.shape[0]} must divide by the {n} ranks of the group "
                "(pad it, as ring_all_reduce does)"
            ],
            "ring reduce-scatter cannot split this tensor",
        )
    reduce = reducer(op)
    chunks = list(x.chunk(n))
    for s in range(n - 1):
        send, recv_i = chunks[(r - s - 1) % n], (r - s - 2) % n
        buf = torch.empty_like(chunks[recv_i])
        exchange(group, sends=[(send, right)], recvs=[(buf, left)])
        chunks[recv_i] = reduce(chunks[recv_i], buf)  # my contribution joins the partial sum
    return chunks[r]


def ring_all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order: N-1 steps."""
    r, n, left, right = ring_neighbours(group)
    if n == 1:
        return x
    blocks = [None] * n
    blocks[r] = x.contiguous()
    for s in range(n - 1):
        buf = torch.empty_like(blocks[r])
        exchange(group, sends=[(blocks[(r - s) % n], right)], recvs=[(buf, left)])
        blocks[(r - s - 1) % n] = buf
    return torch.cat(blocks)


def ring_all_reduce(x: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce `x` over the group in 2(N-1) neighbour steps; returns the result (x is unchanged)."""
    n = len(group_ranks(group)[1])
    if n == 1:
        return x
    flat = pad_to(x.flatten(), n)  # N equal chunks
    mine = ring_reduce_scatter(flat, group, op)  # rank r: the full sum of chunk r
    return ring_all_gather(mine, group)[: x.numel()].view_as(x)
