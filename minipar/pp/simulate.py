"""Time a schedule under per-op costs with the one simulator (`minipar.sim`).

Costs, per micro-batch on one rank: t_f forward, t_b full backward; with t_w the
backward splits into I = t_b - t_w and W = t_w (default t_w = t_b / 2 when the
schedule uses I/W). One action of a schedule with v chunks per rank costs
`schedule.chunk_cost` of that (1/v; 1 for DualPipe's mirrored stages, which a
micro-batch visits only one of). A stage-to-stage transfer between ranks costs t_comm.

Reported:
    makespan        = last end
    busy[r]         = sum of rank r's op times
    span[r]         = last end - first start on rank r
    bubble_fraction = sum_r (makespan - busy[r]) / (p * makespan)
    peak_activations[r] = max over time of (stage, mb) pairs with F done and B/I not yet
    bubble[r]       = span[r] - busy[r], idle inside a rank's span: the papers' per-rank bubble
                      when, as in ZB-H2/ZB-V, the warm-up stagger overlaps the neighbouring step

Closed forms this reproduces exactly (tests/test_pp_schedules.py):
    GPipe, 1F1B:   makespan = (m + p - 1)(t_f + t_b)          (Huang et al. 2019; Narayanan et al. 2021)
                   bubble   = (p-1)/(m+p-1), i.e. (p-1)/m of the ideal m(t_f+t_b)
    interleaved:   makespan = (m + (p-1)/v)(t_f + t_b)         (Narayanan et al. 2021, Sec. 2.2)
and, at t_f = t_i = t_w (the papers' assumption):
    ZB-H1:         makespan - busy = (p-1)(t_f + t_b - 2 t_w), 1/3 of 1F1B  (Qi et al. 2024, Table 1)
    ZB-H2, ZB-V:   bubble[r] = 0, peak 2p-1 resp. 2p half-size chunks      (Qi et al. 2024, Table 1, Sec. 6)
and, with F, B, W the costs of one chunk (one stage) and F&B of an overlapped pair,
    DualPipe(V):   max_r (makespan - busy[r]) = (PP/2-1)(F&B+B-3W), peak PP+1 stages'
                   activations; PP = p for DualPipe, 2p stages on p devices for DualPipeV
                   (DeepSeek-V3 report, Table 2; github.com/deepseek-ai/DualPipe)
The F&B pairs (`schedule.overlapped`) start together, once both inputs have arrived, and
take t_fb (default t_f + t_b: overlap hides nothing); F's output leaves when its share,
t_fb * t_f / (t_f + t_b), is done. With t_fb = t_f + t_b every rank idles the table's
amount; with max(t_f, t_b) <= t_fb < t_f + t_b the ranks nearest the middle do.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import sim
from ..trace import Event
from .schedules import Action, Schedule

__all__ = ["SimResult", "simulate", "op_graph"]


@dataclass
class SimResult:
    schedule: Schedule
    makespan: float
    busy: dict
    span: dict
    bubble_fraction: float
    peak_activations: dict
    times: dict  # Action -> (start, end)

    @property
    def bubble(self) -> dict:
        """Idle time inside each rank's span (the Zero Bubble paper's per-rank bubble)."""
        return {r: self.span[r] - self.busy[r] for r in self.busy}

    def events(self) -> list:
        """trace.Events on the modeled clock, for `plot_timeline(..., clock="modeled")`."""
        rank = {a: r for r, acts in self.schedule.actions.items() for a in acts}
        return sorted(
            (Event(rank[a], str(a), "compute", s, e) for a, (s, e) in self.times.items()),
            key=lambda e: (e.rank, e.start),
        )


def grad_producer(schedule: Schedule, stage: int, mb: int, present: set) -> Action | None:
    """The action that produces d(loss)/d(output of `stage`) for `mb`: I (or B) of the next stage."""
    nxt = schedule.next_stage(stage, mb)
    if nxt is None:
        return None
    return Action(nxt, "I", mb) if Action(nxt, "I", mb) in present else Action(nxt, "B", mb)


def deps_of(schedule: Schedule, a: Action, present: set) -> list:
    """The data dependencies of a compute action: [(producer, crosses_ranks)]. The F of an
    F&B pair also waits for its partner's inputs: the pair starts as one unit."""
    s, mb = a.stage, a.mb
    if a.kind == "F":
        prev = schedule.prev_stage(s, mb)
        own = (
            []
            if prev is None
            else [(Action(prev, "F", mb), schedule.stage_to_rank[prev] != schedule.stage_to_rank[s])]
        )
        partner = schedule.overlapped.get(a)
        return own + (
            [] if partner is None else [d for d in deps_of(schedule, partner, present) if d[0] != a]
        )
    if a.kind in ("B", "I"):
        out = [(Action(s, "F", mb), False)]
        g = grad_producer(schedule, s, mb, present)
        if g is not None:
            out.append((g, schedule.stage_to_rank[g.stage] != schedule.stage_to_rank[s]))
        return out
    return [(Action(s, "I", mb), False)]  # W after its own I


def op_graph(schedule: Schedule, t_f=1.0, t_b=2.0, t_w=None, t_comm=0.0, t_fb=None) -> dict:
    """The schedule as simulator lanes: one lane per rank, one Op per compute action."""
    if t_w is None:
        t_w = t_b / 2
    if not 0 <= t_w <= t_b:
        raise ValueError(f"t_w={t_w} must lie in [0, t_b={t_b}]: W is part of the backward")
    t_fb = t_f + t_b if t_fb is None else t_fb
    if not max(t_f, t_b) <= t_fb <= t_f + t_b:
        raise ValueError(
            f"t_fb={t_fb} must lie in [max(t_f, t_b), t_f + t_b] = [{max(t_f, t_b)}, {t_f + t_b}]: "
            "overlapping an F with a B cannot take longer than running them in turn, "
            "nor less than the longer of the two"
        )
    c = schedule.chunk_cost
    cost = {"F": t_f * c, "B": t_b * c, "I": (t_b - t_w) * c, "W": t_w * c}
    in_pair = set(schedule.overlapped) | set(schedule.overlapped.values())
    shrink = t_fb / (t_f + t_b) if t_f + t_b else 1.0  # an F&B pair shares t_fb in proportion
    present = {a for acts in schedule.actions.values() for a in acts}
    return {
        r: [
            sim.Op(
                a,
                r,
                cost[a.kind] * (shrink if a in in_pair else 1.0),
                tuple((d, t_comm if cross else 0.0) for d, cross in deps_of(schedule, a, present)),
            )
            for a in acts
            if a.is_compute
        ]
        for r, acts in sorted(schedule.actions.items())
    }


def peak_activations(schedule: Schedule) -> dict:
    """Per rank, the most (stage, mb) pairs alive at once: +1 at F, -1 at B or I."""
    out = {}
    for r, acts in schedule.actions.items():
        live = peak = 0
        for a in acts:
            live += {"F": 1, "B": -1, "I": -1}.get(a.kind, 0)
            peak = max(peak, live)
        out[r] = peak
    return out


def simulate(
    schedule: Schedule,
    t_f: float = 1.0,
    t_b: float = 2.0,
    t_w: float | None = None,
    t_comm: float = 0.0,
    t_fb: float | None = None,
) -> SimResult:
    """Time `schedule`; see the module docstring for what each number means. `t_fb` is the
    cost of one of DualPipe's overlapped F&B pairs in the units of t_f + t_b (default t_f + t_b)."""
    done = sim.run(op_graph(schedule, t_f, t_b, t_w, t_comm, t_fb))
    times = {k: (op.start, op.end) for k, op in done.items()}
    makespan = max(e for _, e in times.values())
    busy, span = {}, {}
    for r, acts in sorted(schedule.actions.items()):
        ts = [times[a] for a in acts if a.is_compute]
        busy[r] = sum(e - s for s, e in ts)
        span[r] = max(e for _, e in ts) - min(s for s, _ in ts)
    p = schedule.num_ranks
    bubble = sum(makespan - b for b in busy.values()) / (p * makespan)
    return SimResult(schedule, makespan, busy, span, bubble, peak_activations(schedule), times)
