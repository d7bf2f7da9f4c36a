"""All-to-all by pairwise exchange (Thakur, Rabenseifner & Gropp 2005, Sec. 3.3: MPICH's
algorithm for long messages).

Rank r holds N blocks along dim 0, block j meant for rank j. In step k = 1, ..., N-1 it sends
block (r+k) mod N to rank r+k and receives, from rank r-k, that rank's block r. Its own block
never moves. Every step is one message of S/N bytes each way, and no two messages of a step
go to the same rank:                               α count N-1, β count (N-1)/N · S

(Thakur's pairwise exchange pairs r with r XOR k when N is a power of two, so that partners
swap; the r±k form works for any N at the same cost.) This is what Megatron's expert
parallelism and DeepSpeed-Ulysses pay for every all-to-all: the bytes of an all-gather, with
none of them replicated.
"""

from __future__ import annotations

import torch

from ..validation import ConfigError
from .steps import exchange, group_ranks

__all__ = ["pairwise_all_to_all"]


def pairwise_all_to_all(x: torch.Tensor, group=None) -> torch.Tensor:
    """Block j of dim 0 goes to rank j; returns the blocks received, in rank order (like
    `comm.all_to_all` with even splits): N-1 steps."""
    me, ranks = group_ranks(group)
    n = len(ranks)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ConfigError(
            [f"dim 0 of size {x.shape[0]} must divide by the {n} ranks of the group: block j goes to rank j"],
            "pairwise all-to-all cannot split this tensor",
        )
    blocks = list(x.contiguous().chunk(n))
    out = [None] * n
    out[me] = blocks[me].clone()
    for k in range(1, n):
        to, frm = (me + k) % n, (me - k) % n
        out[frm] = torch.empty_like(blocks[frm])
        exchange(group, sends=[(blocks[to], ranks[to])], recvs=[(out[frm], ranks[frm])])
    return torch.cat(out)
