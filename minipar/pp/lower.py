"""Lowering: add the SEND/RECV actions a compute schedule implies.

Rules (the executor relies on each):
  * F(s, i) whose next stage lives on another rank is followed by SEND_F(s, i) to it;
    B/I(s, i) whose previous stage lives on another rank is followed by SEND_B(s, i).
  * Receives are posted one compute action ahead of the action that needs them, so
    the transfer overlaps that action (posted irecvs).
  * Between two ranks, messages are received in the order they were sent: NCCL
    matches point-to-point operations per pair in FIFO order and ignores tags. So a
    rank that needs message k from a peer first posts every earlier one from it.
Sends never block (isend) and posting a receive never blocks; a rank waits only
when a compute action needs a received tensor. `validate` checks the result cannot deadlock
under that model, which holds for gloo.

NCCL is stricter, and this path is untested there (no multi-GPU machine yet): it runs a pair
of ranks' sends and receives in issue order on one stream, and a send larger than NCCL's
buffers waits for its receive. In 1F1B's steady state rank r issues send(F_i+1) then
recv(B_i) while rank r+1 issues send(B_i) then recv(F_i+1): each send waits for a receive
queued behind the other rank's send, a cycle, for large activations. The cure is what
Megatron-LM (send_forward_recv_backward) and torch.distributed.pipelining do: issue a
compute's sends together with the next receive as one `comm.batch_p2p` group, which NCCL
progresses as a unit; and teach `validate` that ordering model, so it proves the batched
program deadlock-free the way it proves this one for gloo.
"""
from __future__ import annotations

from collections import defaultdict

from .schedules import Action, Schedule

__all__ = ["lower", "messages_in", "message_out"]


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


def lower(schedule: Schedule) -> dict[int, list[Action]]:
    """{rank: compute actions with SEND_*/RECV_* inserted}. A message key is (direction, the
    receiving stage, mb); SEND actions carry the sending stage, RECV the receiving one."""
    # Pass 1: the order in which each pair's messages are sent.
    sent = defaultdict(list)                          # (src, dst) -> [message key]
    for r, acts in schedule.actions.items():
        for a in acts:
            out = message_out(schedule, a)
            if out:
                sent[r, out[0]].append(out[1])
    order = {pair: {k: i for i, k in enumerate(keys)} for pair, keys in sent.items()}
    # Pass 2: each rank's list, receives posted one compute action early, in send order.
    lowered = {}
    for r, acts in sorted(schedule.actions.items()):
        posted = defaultdict(int)                     # src -> messages posted so far
        out = []

        def post_for(a):
            need = messages_in(schedule, a)
            if need is None:
                return
            src, key = need
            k = order.get((src, r), {}).get(key)
            if k is None:
                raise ValueError(f"rank {r}: {a} needs {key} from rank {src}, which never sends it")
            while posted[src] <= k:
                d, stage, mb = sent[src, r][posted[src]]
                out.append(Action(stage, f"RECV_{d}", mb, peer=src))
                posted[src] += 1

        if acts:
            post_for(acts[0])
        for i, a in enumerate(acts):
            if i + 1 < len(acts):
                post_for(acts[i + 1])
            out.append(a)
            msg = message_out(schedule, a)
            if msg:
                out.append(Action(a.stage, "SEND_F" if a.kind == "F" else "SEND_B", a.mb, peer=msg[0]))
        lowered[r] = out
    return lowered
