"""What was handed to the torch.distributed backend, recorded by wrapping its entry points.

Measured bytes in the tests come from here (or from the send/recv-level trace of
`minipar.collectives`), never from `trace.Event.wire_bytes`, which `minipar.comm` computes
with the ring formula the tests would compare it with. Use inside a rank (a forked process,
so the patch stays local to it):

    with handed_to_backend() as log:
        ...                                  # log: [Call(op, nbytes, sent, n)]

`nbytes` is the payload in trace's convention (all_reduce: the tensor; all_gather: its output;
reduce_scatter: its input; all_to_all: its input; batch_p2p: every send's and receive's tensor);
`sent` is what this rank's own arguments say leaves it where that is known without a ring model
(all_to_all: the rows for other ranks; batch_p2p: the sends; broadcast: the tensor at the source).
Single isend/irecv are not wrapped: `dist.P2POp` accepts only torch's own functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from minipar import comm


@dataclass
class Call:
    op: str
    nbytes: int
    sent: int | None
    n: int  # ranks in the group


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def _n(group) -> int:
    return dist.get_world_size(group)


@contextmanager
def handed_to_backend():
    log: list[Call] = []
    saved = {}

    def patch(owner, name, record):
        fn = getattr(owner, name)
        saved[owner, name] = fn

        def call(*args, **kw):
            log.append(record(*args, **kw))
            return fn(*args, **kw)

        setattr(owner, name, call)

    def all_to_all(out, t, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        n, me = _n(group), dist.get_rank(group)
        row = _bytes(t) // t.shape[0] if t.shape[0] else 0
        own = (input_split_sizes[me] if input_split_sizes is not None else t.shape[0] // n) * row
        return Call("all_to_all", _bytes(t), _bytes(t) - own, n)

    def batch(ops):
        sends = [op for op in ops if op.op is dist.isend]
        return Call(
            "batch_p2p",
            sum(_bytes(op.tensor) for op in ops),
            sum(_bytes(op.tensor) for op in sends),
            _n(ops[0].group) if ops else 1,
        )

    patch(
        dist,
        "all_reduce",
        lambda t, op=None, group=None, async_op=False: Call("all_reduce", _bytes(t), None, _n(group)),
    )
    patch(
        comm,
        "_all_gather_single",
        lambda out, src, group=None, async_op=False: Call("all_gather", _bytes(out), None, _n(group)),
    )
    patch(
        comm,
        "_reduce_scatter_single",
        lambda out, src, op=None, group=None, async_op=False: Call(
            "reduce_scatter", _bytes(src), None, _n(group)
        ),
    )
    patch(dist, "all_to_all_single", all_to_all)
    patch(
        dist,
        "broadcast",
        lambda t, src, group=None, async_op=False: Call(
            "broadcast", _bytes(t), _bytes(t) if dist.get_rank() == src else 0, _n(group)
        ),
    )
    patch(dist, "batch_isend_irecv", batch)
    try:
        yield log
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def total(log, op: str, field: str = "nbytes") -> int:
    return sum(getattr(c, field) for c in log if c.op == op)
