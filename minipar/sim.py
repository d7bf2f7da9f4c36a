"""One discrete-event simulator for everything minipar times on a modeled clock.

The model: each *lane* (a rank's compute stream, or a link) runs its ops in the
given order, one at a time. An op starts when the previous op on its lane has
ended and every dependency has ended (plus that dependency's delay):

    start(op) = max(end(prev op on lane), max over deps d of end(d) + delay(d))
    end(op)   = start(op) + duration(op)

That is all a pipeline schedule, a recorded trace or a cluster-scale step needs:
`minipar.pp.simulate` builds ops from a schedule, `retime` builds them from a real
run's trace (the "modeled clock"), and the planner builds them from formulas.
If no lane can make progress the op graph has a cycle: `Deadlock` names the ops
that wait on each other (the pipeline validator uses this to reject schedules).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable

from .trace import Event

__all__ = ["Op", "Deadlock", "run", "retime"]


@dataclass
class Op:
    key: Hashable  # unique name, e.g. (rank, "0F1")
    lane: Hashable  # ops on one lane run one at a time, in list order
    duration: float
    deps: tuple = ()  # keys, or (key, delay) pairs (so no key may itself be a (x, number) pair)
    start: float = field(default=0.0, compare=False)
    end: float = field(default=0.0, compare=False)
    data: object = field(default=None, compare=False)  # whatever the caller wants back (e.g. the Event)


class Deadlock(RuntimeError):
    pass


def _deps(op: Op) -> list:
    """Dependencies as (key, delay) pairs."""
    return [
        d
        if isinstance(d, tuple)
        and len(d) == 2
        and isinstance(d[1], (int, float))
        and not isinstance(d[1], bool)
        else (d, 0.0)
        for d in op.deps
    ]


def run(lanes: dict[Hashable, list[Op]]) -> dict[Hashable, Op]:
    """Time every op in place; returns {key: op}. Raises Deadlock if some ops can never start."""
    done: dict[Hashable, Op] = {}
    pos = {lane: 0 for lane in lanes}
    free = {lane: 0.0 for lane in lanes}
    remaining = sum(len(ops) for ops in lanes.values())
    while remaining:
        progress = False
        for lane, ops in lanes.items():
            while pos[lane] < len(ops):
                op = ops[pos[lane]]
                deps = _deps(op)
                if any(k not in done for k, _ in deps):
                    break
                op.start = max([free[lane]] + [done[k].end + delay for k, delay in deps])
                op.end = op.start + op.duration
                free[lane] = op.end
                done[op.key] = op
                pos[lane] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [ops[pos[lane]] for lane, ops in lanes.items() if pos[lane] < len(ops)]
            lines = [
                f"{op.key} on lane {op.lane} waits for {[k for k, _ in _deps(op) if k not in done]}"
                for op in stuck
            ]
            raise Deadlock("no lane can make progress (a dependency cycle):\n  " + "\n  ".join(lines))
    return done


# ----------------------------------------------------------------------------- modeled clock
_KIND = re.compile(r"^\d*([FBIW])\d*$")


def _cost(costs, ev) -> float:
    if callable(costs):
        return float(costs(ev))
    if ev.name in costs:
        return float(costs[ev.name])
    m = _KIND.match(ev.name)
    if m and m.group(1) in costs:
        return float(costs[m.group(1)])
    return float(costs.get(ev.cat, 0.0))


def _named_recvs(e) -> list:
    """The (peer, k) receives a compute event says it waited for: meta["recv"] is one or a list."""
    r = e.meta.get("recv")
    if not r:
        return []
    return [tuple(x) for x in r] if isinstance(r[0], (list, tuple)) else [tuple(r)]


def retime(events: list, costs, p2p=0.0) -> list:
    """Re-time a recorded run: keep what happened in what order, replace how long it took.

    `events` are trace.Events of all ranks (e.g. `trace.gather()`). `costs` maps an
    op to modeled seconds: a dict keyed by event name ("0F1"), kind letter ("F", "B",
    "I", "W") or category ("compute"), or a callable(event). `p2p` is the modeled time
    of one send->recv transfer: seconds, or a callable(bytes) (a hardware model such as
    latency + bytes / bandwidth).

    Rules, all taken from the real run's ordering:
      * each rank's compute spans run in their recorded order;
      * a send is posted when the compute before it (on the real clock) ends;
      * the k-th recv on b from a completes p2p after the k-th send from a to b is posted;
      * a compute span starts after the recvs it names in `meta["recv"]`: (peer, k), its
        k-th receive from peer, or a list of them; if it names none, after every recv that
        completed before it started.
    Collectives are kept on their rank's compute lane at their `costs` price.
    Returns new Events (same names and metadata) on the modeled clock."""
    xfer = p2p if callable(p2p) else (lambda nbytes, c=float(p2p): c)
    by_rank = defaultdict(list)
    for e in events:
        by_rank[e.rank].append(e)
    lanes: dict = {}
    sends, recvs = defaultdict(list), defaultdict(list)  # (src, dst) -> [op key], in posting order
    after_recv = defaultdict(list)  # compute key -> recv keys it waits on
    for r, evs in by_rank.items():
        seq = sorted(
            (e for e in evs if e.cat != "comm" or e.name not in ("send", "recv")), key=lambda e: e.start
        )
        lanes[r] = [Op(("op", r, i), r, _cost(costs, e), data=e) for i, e in enumerate(seq)]
        starts, ends = [e.start for e in seq], [e.end for e in seq]
        named = {tuple(src): i for i, e in enumerate(seq) for src in _named_recvs(e)}
        for j, e in enumerate(
            sorted((e for e in evs if e.name == "send" and e.cat == "comm"), key=lambda e: e.start)
        ):
            before = [i for i, t in enumerate(ends) if t <= e.start]
            key = ("send", r, j)
            lanes[key] = [Op(key, key, xfer(e.bytes), (("op", r, before[-1]),) if before else (), data=e)]
            sends[(r, e.meta.get("peer"))].append(key)
        for j, e in enumerate(
            sorted((e for e in evs if e.name == "recv" and e.cat == "comm"), key=lambda e: e.start)
        ):
            key, peer = ("recv", r, j), e.meta.get("peer")
            lanes[key] = [Op(key, key, 0.0, data=e)]
            recvs[peer, r].append(key)
            k = len(recvs[peer, r]) - 1  # this is the k-th receive from peer
            nxt = [named[peer, k]] if (peer, k) in named else [i for i, t in enumerate(starts) if t >= e.end]
            if nxt:
                after_recv[("op", r, nxt[0])].append(key)
    for pair, keys in recvs.items():
        if len(keys) != len(sends.get(pair, [])):
            raise ValueError(
                f"retime: {len(sends.get(pair, []))} sends but {len(keys)} recvs between ranks {pair}; "
                "pass the events of every rank (trace.gather())"
            )
        for rk, sk in zip(keys, sends[pair]):
            lanes[rk][0].deps = (sk,)  # completes when the send's transfer ends
    for lane in lanes.values():
        for op in lane:
            if op.key in after_recv:
                op.deps = tuple(op.deps) + tuple(after_recv[op.key])
    done = run(lanes)
    out = []
    for op in done.values():
        e = op.data
        start = op.start if e.name != "recv" else done[op.deps[0]].start
        out.append(
            Event(
                e.rank,
                e.name,
                e.cat,
                start,
                op.end,
                axis=e.axis,
                bytes=e.bytes,
                wire_bytes=e.wire_bytes,
                flops=e.flops,
                meta=dict(e.meta),
            )
        )
    return sorted(out, key=lambda e: (e.rank, e.start))
