"""Lowering: add the SEND/RECV actions a compute schedule implies.

Rules (the executor relies on each):
  * F(s, i) whose next stage lives on another rank is followed by SEND_F(s, i) to it;
    B/I(s, i) whose previous stage lives on another rank is followed by SEND_B(s, i).
  * Both ranks of a pair post their messages to each other in one order (`pair_order`):
    the order the simulator, at unit costs, sends them in. NCCL needs this. It runs a pair's
    sends and receives in issue order on one stream, and a send larger than its buffers
    waits for its receive; so if rank 0 posted recv(B0) before send(F1) while rank 1 needs
    F1 before it sends B0 (GPipe with receives posted early), both would wait forever.
    Posting in one causal order on both sides makes every queue head meet its partner.
    It also keeps each direction first-in first-out, which NCCL's tag-less matching needs.
  * Within that order, receives are posted one compute action ahead of the action that
    needs them, so the transfer overlaps that action (posted irecvs).
Posting never blocks; a rank waits only when a compute action needs a received tensor.
`validate` checks the result under gloo's model (sends never block) and under NCCL's
(in-order rendezvous per pair, `check_rendezvous`). Multi-GPU NCCL runs are still untested here.
"""

from __future__ import annotations

from collections import defaultdict

from .. import sim
from .schedules import Action, Schedule
from .simulate import op_graph

__all__ = ["lower", "pair_order", "inputs_of", "messages_in", "message_out"]


def message_out(schedule: Schedule, a: Action) -> tuple | None:
    """(dst rank, consuming Action-kind key) of what compute action `a` sends, or None."""
    rank = schedule.stage_to_rank
    if a.kind == "F":
        nxt = schedule.next_stage(a.stage, a.mb)
        if nxt is not None and rank[nxt] != rank[a.stage]:
            return rank[nxt], ("F", nxt, a.mb)
    elif a.kind in ("B", "I"):
        prev = schedule.prev_stage(a.stage, a.mb)
        if prev is not None and rank[prev] != rank[a.stage]:
            return rank[prev], ("B", prev, a.mb)
    return None


def messages_in(schedule: Schedule, a: Action) -> tuple | None:
    """(src rank, message key) compute action `a` must receive first, or None."""
    rank = schedule.stage_to_rank
    if a.kind == "F":
        prev = schedule.prev_stage(a.stage, a.mb)
        if prev is not None and rank[prev] != rank[a.stage]:
            return rank[prev], ("F", a.stage, a.mb)
    elif a.kind in ("B", "I"):
        nxt = schedule.next_stage(a.stage, a.mb)
        if nxt is not None and rank[nxt] != rank[a.stage]:
            return rank[nxt], ("B", a.stage, a.mb)
    return None


def pair_order(schedule: Schedule) -> dict:
    """{(lo, hi) ranks: [(src, dst, key)]}: every message between two ranks, in the order both
    post them. It is the order the simulator (unit costs) sends them in, ties broken by sender:
    a causal order, so neither rank ever has to post an operation whose data needs a later one."""
    done = {k: op.end for k, op in sim.run(op_graph(schedule, 1.0, 2.0, 1.0)).items()}  # sim.Deadlock if none
    msgs = sorted(
        (done[a], r, *out)
        for r, acts in schedule.actions.items()
        for a in acts
        if (out := message_out(schedule, a))
    )
    order = defaultdict(list)
    for _, src, dst, key in msgs:
        order[min(src, dst), max(src, dst)].append((src, dst, key))
    return dict(order)


def inputs_of(schedule: Schedule, a: Action) -> list:
    """[(src rank, message key)] compute action `a` waits for: its own input and, for the F of
    an F&B pair, its partner's (the pair starts as one unit)."""
    return [
        need
        for x in (a, schedule.overlapped.get(a))
        if x is not None and (need := messages_in(schedule, x)) is not None
    ]


def lower(schedule: Schedule) -> dict[int, list[Action]]:
    """{rank: compute actions with SEND_*/RECV_* inserted}. A message key is (direction, the
    receiving stage, mb); SEND actions carry the sending stage, RECV the receiving one."""
    order = pair_order(schedule)
    lowered = {}
    for r, acts in sorted(schedule.actions.items()):
        mine = {(lo if hi == r else hi): msgs for (lo, hi), msgs in order.items() if r in (lo, hi)}
        at, sent, out = defaultdict(int), set(), []  # peer -> position reached in the pair's order

        def advance(peer, until=None) -> bool:
            """Post the pair's receives in order, up to message `until` (True once it is posted),
            stopping at a send of ours whose data is not computed yet."""
            msgs = mine.get(peer, [])
            while at[peer] < len(msgs):
                src, dst, key = msgs[at[peer]]
                if src == r:
                    if (dst, key) not in sent:
                        return False
                else:
                    out.append(Action(key[1], f"RECV_{key[0]}", key[2], peer=src))
                at[peer] += 1
                if (src, dst, key) == until:
                    return True
            return until is None

        def post_for(a, required):
            for src, key in inputs_of(schedule, a):
                msgs = mine.get(src, [])
                if (src, r, key) not in msgs:
                    raise ValueError(f"rank {r}: {a} needs {key} from rank {src}, which never sends it")
                if msgs.index((src, r, key)) >= at[src] and not advance(src, (src, r, key)) and required:
                    raise ValueError(f"rank {r}: cannot post the receive of {key} before a send it waits for")

        if acts:
            post_for(acts[0], True)
        for i, a in enumerate(acts):
            post_for(a, True)
            if i + 1 < len(acts):
                post_for(acts[i + 1], False)  # posted early: the transfer overlaps `a`
            out.append(a)
            msg = message_out(schedule, a)
            if msg:
                sent.add(msg)
                advance(msg[0], (r, *msg))  # first the receives ordered before it, if any
                out.append(Action(a.stage, "SEND_F" if a.kind == "F" else "SEND_B", a.mb, peer=msg[0]))
        lowered[r] = out
    return lowered
