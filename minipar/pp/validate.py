"""The validator: is a schedule complete, ordered, and free of deadlock once lowered?

Checks, each with a message that names the offending action:
  1. every action runs on the rank that holds its stage;
  2. completeness: every (stage, mb) on mb's path has exactly one F, and one B or
     one I and one W; nothing else;
  3. order on a rank: F before its B/I, I before its W; each overlapped F&B pair is an
     F directly followed on its rank by a B/I of another stage;
  4. the lowered program (SEND/RECV, see `lower`) receives each pair's messages in the
     order they were sent, posts each receive before the action that needs it, and
     cannot deadlock: timed by the one simulator (`minipar.sim`) with non-blocking sends
     and receives that complete when their send has run, it must finish. A cycle of
     waits (rank a waits for b, which waits for a) raises `sim.Deadlock` there;
  5. nor under NCCL's stricter rules (`check_rendezvous`): a pair of ranks' sends and
     receives run in issue order on one stream, and a large send completes only together
     with its receive. `lower` posts each pair's messages in one causal order on both
     ranks, which is what makes this hold.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .. import sim
from .lower import inputs_of, lower
from .schedules import Action, Schedule
from .simulate import deps_of

__all__ = ["ScheduleError", "validate"]


class ScheduleError(ValueError):
    pass


def validate(schedule: Schedule) -> dict:
    """Raise ScheduleError naming the first problem; return the lowered schedule if valid."""
    S = schedule.num_stages
    seen = Counter()
    for r, acts in schedule.actions.items():
        for a in acts:
            if not a.is_compute:
                raise ScheduleError(
                    f"rank {r}: {a} is not a compute action (F, B, I, W); lower() adds SEND/RECV"
                )
            if not 0 <= a.stage < S or schedule.stage_to_rank[a.stage] != r:
                raise ScheduleError(
                    f"rank {r}: {a} runs stage {a.stage}, which lives on rank "
                    f"{schedule.stage_to_rank[a.stage] if 0 <= a.stage < S else '(none)'}"
                )
            if not 0 <= a.mb < schedule.num_microbatches or a.stage not in schedule.paths[a.mb]:
                raise ScheduleError(
                    f"rank {r}: {a}: micro-batch {a.mb} does not pass through stage {a.stage}"
                )
            seen[a.stage, a.kind, a.mb] += 1
    for (s, k, i), n in seen.items():
        if n > 1:
            raise ScheduleError(f"{Action(s, k, i)} appears {n} times; each action runs exactly once")
    for i, path in enumerate(schedule.paths):
        for s in path:
            f, b, inp, w = (seen[s, k, i] for k in "FBIW")
            if not f:
                raise ScheduleError(
                    f"{Action(s, 'F', i)} is missing: every stage on a micro-batch's path runs F"
                )
            if b + inp == 0:
                raise ScheduleError(
                    f"{Action(s, 'B', i)} (or {Action(s, 'I', i)} + {Action(s, 'W', i)}) is missing"
                )
            if b and (inp or w):
                raise ScheduleError(f"{Action(s, 'B', i)} and its I/W both appear; use B, or I then W")
            if inp != w:
                raise ScheduleError(
                    f"{Action(s, 'I' if inp else 'W', i)} has no matching "
                    f"{Action(s, 'W' if inp else 'I', i)}: a split backward needs both halves"
                )
    for r, acts in schedule.actions.items():
        pos = {a: j for j, a in enumerate(acts)}
        for a in acts:
            before = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
            if before and pos.get(Action(a.stage, before, a.mb), -1) > pos[a]:
                raise ScheduleError(f"rank {r}: {a} comes before {Action(a.stage, before, a.mb)}")
    for f, b in schedule.overlapped.items():
        r = schedule.stage_to_rank[f.stage]
        acts = schedule.actions.get(r, [])
        i = acts.index(f) if f in acts else -1
        if (
            f.kind != "F"
            or b.kind not in ("B", "I")
            or f.stage == b.stage
            or i < 0
            or acts[i + 1 : i + 2] != [b]
        ):
            raise ScheduleError(
                f"overlapped pair ({f}, {b}): an F&B pair is an F followed directly on its rank "
                "by a backward (B or I) of another stage"
            )
    try:  # lower() simulates the schedule: can its compute actions run in these orders?
        lowered = lower(schedule)
    except sim.Deadlock as e:
        raise ScheduleError(f"the schedule deadlocks: {e}") from None
    _check_lowered(schedule, lowered)
    check_rendezvous(schedule, lowered)
    return lowered


def check_rendezvous(schedule: Schedule, lowered: dict) -> None:
    """Run `lowered` under NCCL's point-to-point rules and raise ScheduleError if it stalls:
    each rank's operations with one peer form a queue (one stream, issue order); the heads of
    a's queue to b and b's queue to a complete together when they are the two ends of one
    message (a rendezvous: a send larger than NCCL's buffers waits for its receive). A compute
    action waits for the receives it consumes; posting never blocks the host."""
    pc = {r: 0 for r in lowered}
    queue, count, got = defaultdict(list), Counter(), defaultdict(set)  # (rank, peer) -> ops
    moved = True
    while moved:
        moved = False
        for r, acts in lowered.items():  # each host runs until a compute must wait
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if a.is_compute:
                    if not all(key in got[r] for _, key in inputs_of(schedule, a)):
                        break
                else:
                    src, dst = (r, a.peer) if a.kind.startswith("SEND") else (a.peer, r)
                    key = (a.kind[-1], a.stage, a.mb) if a.kind.startswith("RECV") else None
                    queue[r, a.peer].append((src, dst, count[r, a.peer, a.kind[:4]], key))
                    count[r, a.peer, a.kind[:4]] += 1
                pc[r] += 1
                moved = True
        for (r, peer), q in list(queue.items()):  # match the heads of each pair's queues
            other = queue[peer, r]
            while q and other and q[0][:3] == other[0][:3]:
                for src, dst, _, key in (q.pop(0), other.pop(0)):
                    if key is not None:
                        got[dst].add(key)
                moved = True
    stuck = {r: str(lowered[r][pc[r]]) for r in lowered if pc[r] < len(lowered[r])}
    if stuck:
        raise ScheduleError(
            f"the lowered schedule deadlocks under NCCL's in-order rendezvous: ranks stuck at {stuck}"
        )


def _check_lowered(schedule: Schedule, lowered: dict) -> None:
    present = {a for acts in schedule.actions.values() for a in acts}
    # FIFO per pair: the k-th SEND a->b must be the k-th RECV on b from a.
    sends, recvs = defaultdict(list), defaultdict(list)
    for r, acts in lowered.items():
        for a in acts:
            if a.kind.startswith("SEND"):
                nxt = (schedule.next_stage if a.kind == "SEND_F" else schedule.prev_stage)(a.stage, a.mb)
                sends[r, a.peer].append((a.kind[-1], nxt, a.mb))
            elif a.kind.startswith("RECV"):
                recvs[a.peer, r].append((a.kind[-1], a.stage, a.mb))
    for pair in set(sends) | set(recvs):
        if sends[pair] != recvs[pair]:
            raise ScheduleError(
                f"ranks {pair[0]}->{pair[1]}: sends {sends[pair]} but receives {recvs[pair]} "
                "(point-to-point messages match in FIFO order)"
            )
    # Deadlock: run the lowered program on the simulator with unit costs.
    lanes, msg_index = {}, {}
    for (src, dst), keys in sends.items():
        for k, key in enumerate(keys):
            msg_index[dst, key] = ("msg", src, dst, k)
    for r, acts in sorted(lowered.items()):
        lane, posted, count = [], set(), Counter()
        for a in acts:
            if a.kind.startswith("SEND"):
                k = count[r, a.peer]
                count[r, a.peer] += 1
                lane.append(sim.Op(("send", r, a.peer, k), r, 0.0))
                lanes[("msg", r, a.peer, k)] = [
                    sim.Op(("msg", r, a.peer, k), ("link", r, a.peer, k), 0.0, (("send", r, a.peer, k),))
                ]
            elif a.kind.startswith("RECV"):
                posted.add((a.kind[-1], a.stage, a.mb))
            else:
                deps = [d for d, cross in deps_of(schedule, a, present) if not cross]
                for _, key in inputs_of(schedule, a):  # an F&B pair waits for both halves' inputs
                    if key not in posted:
                        raise ScheduleError(f"rank {r}: {a} runs before its receive of {key} is posted")
                    deps.append(msg_index[r, key])
                lane.append(sim.Op(a, r, 1.0, tuple(deps)))
        lanes[r] = lane
    try:
        sim.run(lanes)
    except sim.Deadlock as e:
        raise ScheduleError(f"the lowered schedule deadlocks: {e}") from None
