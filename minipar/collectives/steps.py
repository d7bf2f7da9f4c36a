"""What every algorithm of this package is made of: one *step* = post every send and receive of
this rank at once (`comm.batch_p2p`, so no pairing order can deadlock), then wait for all of them.

The α-β model (Hockney 1994; Thakur, Rabenseifner & Gropp 2005) prices one step as α + m·β for
a message of m bytes: α is the latency every message pays, β the seconds per byte. A rank may
send one message and receive one in the same step (full duplex). Every message goes through
`minipar.comm`, so the trace holds every byte, and `comm.batch_p2p` stamps the messages of one
step with one `round` id: `cost.critical_path` rebuilds the steps from the trace alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..validation import Problems

__all__ = ["group_ranks", "exchange", "reducer", "pad_to", "OPS"]

# the reductions the algorithms support, as what one step does to two partial results
OPS = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def group_ranks(group=None) -> tuple[int, list[int]]:
    """(this rank's index in `group`, the group's global ranks in group order)."""
    pg, _, n = comm.resolve(group)
    if n == 1:
        return 0, [dist.get_rank() if dist.is_initialized() else 0]
    return comm.local_rank(group), (dist.get_process_group_ranks(pg) if pg is not None else list(range(n)))


def exchange(group, sends=(), recvs=()) -> None:
    """One step: sends [(tensor, global rank)], receives [(buffer, global rank)], all at once."""
    for h in comm.batch_p2p(sends=sends, recvs=recvs, group=group):
        h.wait()


def reducer(op: str):
    """The elementwise function of reduction `op`, or a ConfigError naming the choices."""
    p = Problems()
    p.choice("op", op, OPS)
    p.raise_if_any("this reduction is not available")
    return OPS[op]


def pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """`flat` zero-padded to a multiple of `multiple` elements (a copy: the algorithms work in place).
    Zero is harmless for sum; max and min ignore the padding because it is sliced off at the end."""
    out = flat.new_zeros(-(-flat.numel() // multiple) * multiple)
    out[: flat.numel()] = flat
    return out
