"""Rabenseifner's all-reduce: reduce-scatter by recursive halving, then all-gather by recursive
doubling (Rabenseifner 2004; Thakur, Rabenseifner & Gropp 2005, Sec. 4.4).

For P = 2^L ranks, cut the tensor into P blocks.
  reduce-scatter by recursive halving, L steps: at step k the partner is r XOR P/2^(k+1); the two
      split their current window of blocks in halves, each sends the half it gives up and adds the
      half it keeps. The windows halve (S/2, S/4, ..., S/P bytes sent) until rank r owns block r.
  all-gather by recursive doubling, L steps: the same partners in reverse order (distance 1, 2,
      ..., P/2); each sends its window and receives the partner's, so windows double back to S.
Both phases send S(1 - 1/P):                    α count 2·log2 P, β count 2(P-1)/P · S

the ring's bytes in the tree's number of steps: in the α-β model it beats both whenever N is a
power of two (its real cost is the contention of distant partners on a physical ring or torus).

Any N: with P the largest power of two <= N and E = N - P extra ranks, the first 2E ranks pair up
(0,1), (2,3), ...; before the algorithm each odd one sends its whole tensor to its even partner
and sits out; afterwards the even partner sends the result back. That costs 2 more steps of S:
                                  α count 2·log2 P + 2, β count 2(P-1)/P · S + 2S   (N not 2^L)
(Thakur et al. split this fold into halves to share the additions; in the α-β model, which leaves
out the reduction's compute, the plain fold costs the same bytes in one step fewer.) The tensor
is zero-padded to a multiple of P elements, so that every block has the same size.
"""

from __future__ import annotations

import torch

from .steps import exchange, group_ranks, pad_to, reducer

__all__ = ["halving_doubling_all_reduce"]


def halving_doubling_all_reduce(x: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce `x` over the group by recursive halving then doubling; any group size. Returns the
    result (x is unchanged)."""
    me, ranks = group_ranks(group)
    n = len(ranks)
    if n == 1:
        return x
    reduce = reducer(op)
    P = 1 << (n.bit_length() - 1)  # the largest power of two <= N
    extra = n - P
    flat = pad_to(x.flatten(), P)
    b = flat.numel() // P  # elements per block

    # fold: odd ranks among the first 2E hand their tensor to the even rank on their left
    if me < 2 * extra and me % 2:
        exchange(group, sends=[(flat, ranks[me - 1])])
    else:
        if me < 2 * extra:
            buf = torch.empty_like(flat)
            exchange(group, recvs=[(buf, ranks[me + 1])])
            flat = reduce(flat, buf)
        v = me // 2 if me < 2 * extra else me - extra  # my index among the P that go on

        def peer(w: int) -> int:  # index among the P -> global rank
            return ranks[2 * w if w < extra else w + extra]

        d = P // 2  # reduce-scatter: halving windows
        while d:
            lo = v // (2 * d) * (2 * d)  # my window: blocks [lo, lo + 2d)
            keep, give = (lo, lo + d) if v & d == 0 else (lo + d, lo)
            buf = torch.empty(d * b, dtype=flat.dtype, device=flat.device)
            exchange(
                group, sends=[(flat[give * b : (give + d) * b], peer(v ^ d))], recvs=[(buf, peer(v ^ d))]
            )
            flat[keep * b : (keep + d) * b] = reduce(flat[keep * b : (keep + d) * b], buf)
            d //= 2
        d = 1  # all-gather: doubling windows
        while d < P:
            mine, theirs = v // d * d, (v ^ d) // d * d  # aligned windows of d blocks
            exchange(
                group,
                sends=[(flat[mine * b : (mine + d) * b], peer(v ^ d))],
                recvs=[(flat[theirs * b : (theirs + d) * b], peer(v ^ d))],
            )
            d *= 2
        if me < 2 * extra:  # unfold: the result goes back
            exchange(group, sends=[(flat, ranks[me + 1])])
    if me < 2 * extra and me % 2:
        exchange(group, recvs=[(flat, ranks[me - 1])])
    return flat[: x.numel()].view_as(x)
