"""Exercise of notebook 00: an all-gather built from point-to-point messages, as a ring.

`ring_all_gather(x, group=None)` gets this rank's `x` and returns every rank's `x` concatenated
along dim 0, like `comm.all_gather`. A ring (Patarasuk & Yuan 2009) takes N-1 steps; at each,
every rank sends one block to its right neighbour and receives one from its left, forwarding
at step s the block it received at step s-1: (N-1)/N of the output leaves each rank.

The checker runs it on N = 2..6 ranks and several shapes, compares with `comm.all_gather`,
and reads the structure off the trace: each rank sends only to its right neighbour and
receives only from its left, one block per step, in N-1 steps, and calls no collective.
"""

from __future__ import annotations

import torch

from .. import comm, runtime, trace
from . import Case, Exercise, compare, exercise, student

FIXED = [(2, (1,)), (3, (6,)), (4, (6,)), (5, (2, 3)), (6, (7,))]  # every N from 2 to 6, several sizes


def _cases(rng):
    fixed = [Case(f"N={n}, x of shape {shape}", (shape,), world_size=n) for n, shape in FIXED]
    drawn = [
        Case(f"random case N={n}, x of shape {shape}", (shape,), world_size=n, random=True)
        for n, shape in [(rng.randint(3, 6), (rng.randint(1, 4), rng.randint(1, 9))) for _ in range(2)]
    ]
    return fixed + drawn


def _run(solution, case):
    (shape,) = case.args
    r = runtime.rank()
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1000 * r
    want = comm.all_gather(x)
    trace.reset()
    got = student(solution, x.clone())
    evs = [e for e in trace.events() if e.cat == "comm"]
    p2p = {
        kind: [(e.meta.get("peer"), e.bytes, e.start) for e in evs if e.name == kind]
        for kind in ("send", "recv")
    }
    return dict(
        got=got if isinstance(got, torch.Tensor) else repr(type(got).__name__),
        want=want,
        block=x.numel() * x.element_size(),
        collectives=sorted({e.name for e in evs} - {"send", "recv"}),
        **p2p,
    )


def _judge(case, outputs):
    n = case.world_size
    for r, o in enumerate(outputs):
        right, left = (r + 1) % n, (r - 1) % n
        if o["collectives"]:
            return (
                f"rank {r} called {', '.join(o['collectives'])}; the exercise is to build the all-gather from "
                "send/recv alone",
                "use comm.batch_p2p to your ring neighbours",
            )
        if not isinstance(o["got"], torch.Tensor):
            return (
                f"rank {r} returned a {o['got']}, not a tensor",
                "return torch.cat of the N blocks, in rank order",
            )
        diff = compare(o["got"], o["want"], "gathered tensor", rank=r)
        if diff:
            return (
                diff,
                "block j of the result must be rank j's input; check which block you forward at step s: "
                "the one you received at step s-1",
            )
        others = sorted({p for p, _, _ in o["send"]} - {right})
        if others:
            return (
                f"rank {r} sent to rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}; in a ring "
                f"each rank sends only to its right neighbour ({right})",
                "a message straight to every peer is a direct all-gather, not a ring: forward what you received",
            )
        sources = sorted({p for p, _, _ in o["recv"]} - {left})
        if sources:
            return (
                f"rank {r} received from rank(s) {', '.join(map(str, sources))}; in a ring each rank receives "
                f"only from its left neighbour ({left})",
                "receive from ring_neighbours' left, send to its right",
            )
        sizes = sorted({b for _, b, _ in o["send"]})
        if len(o["send"]) != n - 1 or sizes != [o["block"]]:
            sent = sum(b for _, b, _ in o["send"])
            return (
                f"rank {r} sent {len(o['send'])} message(s), {sent} bytes; a ring all-gather sends one block of "
                f"{o['block']} bytes per step for N-1 = {n - 1} steps",
                "send exactly one block per step, through minipar.comm, and wait on every handle (sends too)",
            )
        steps = len({t for _, _, t in o["send"]})
        if steps != n - 1:
            return (
                f"rank {r} posted its {n - 1} sends in {steps} step(s); a ring takes N-1 = {n - 1} steps, "
                "one block each",
                "post one send and one receive per step, and wait before the next",
            )
    return None


exercise(
    Exercise(
        name="ring_all_gather",
        notebook="00_collectives",
        function="ring_all_gather",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(comm.all_gather,),
        reveals=(),
        deadline=20.0,
        summary="a ring: each rank talks only to its two neighbours, one block per step for N-1 steps, and the "
        "result equals all_gather",
        crash_hint="every send needs a matching receive on the neighbour; post both together with comm.batch_p2p",
    )
)
