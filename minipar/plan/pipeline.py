"""The pipeline's makespan for the planner, from the one simulator (`minipar.pp.simulate`).

Stages need not be equal: the embedding sits on the first, the output head and the loss
on the last, and a layer count that no p divides leaves some stages a layer more. So each
(virtual) stage s has its own per-micro-batch times t_f[s], t_b[s]; the simulator runs the
schedule's op graph (`pp.simulate.op_graph`) with every op priced at its own stage's time,
and the slowest stage sets the steady state.

Simulating thousands of micro-batches for every candidate layout would be slow, so for
m > 4p we simulate 2p and 4p micro-batches and extend the line through them: once every
stage is busy, each further micro-batch adds the same time (tests check this against
simulating all m). Results are cached on the rounded, normalized stage times.

The closed forms the search ranks with (the simulator reproduces them for equal stages):
    GPipe, 1F1B:      m max_r W_r + (sum_r W_r - max_r W_r)        W_r = t_f + t_b of rank r's stage
    interleaved:      m max_r W_r + (sum_r W_r - max_r W_r) / v    W_r = rank r's v chunks together
    ZB-H1:            m max_r W_r + (sum_s t_f[s] - max_s t_f[s])  (Qi et al. 2024, W = B/2)
    DualPipe(V):      m W + (p/2 - 1)(F&B + B - 3W) per the DeepSeek-V3 report, Table 2 (F&B = fb (F + B))
each plus 2(p - 1) t_comm for the sends along the fill and drain.
"""

from __future__ import annotations

from functools import lru_cache

from .. import sim
from ..pp import build_schedule
from ..pp.simulate import op_graph

__all__ = ["pipeline_makespan", "simulator_available", "SCHEDULE_ALIASES", "PIPELINE_SCHEDULES"]

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dualpipe", "dualpipev")
SCHEDULE_ALIASES = {"interleaved": "interleaved_1f1b", "zb-h1": "zb_h1"}  # the planner's old names


def simulator_available() -> bool:
    return True  # minipar.pp sits above plan in the layer diagram: always importable


def _stages_of(schedule: str, p: int, v: int) -> int:
    """Model chunks: p·v (interleaved), 2p (DualPipeV's V), p (DualPipe's two mirrored copies)."""
    return 2 * p if schedule == "dualpipev" else p * v if schedule == "interleaved_1f1b" else p


def _rank_work(schedule: str, p: int, T: list) -> list:
    """Per-micro-batch work of each rank (DualPipe: half its micro-batches run part r, half part p-1-r)."""
    if schedule == "dualpipev":
        return [T[r] + T[2 * p - 1 - r] for r in range(p)]
    if schedule == "dualpipe":
        return [(T[r] + T[p - 1 - r]) / 2 for r in range(p)]
    return [sum(T[r::p]) for r in range(p)]


@lru_cache(maxsize=256)
def _graph(schedule: str, p: int, m: int, v: int) -> tuple:
    """The schedule's op graph (`pp.simulate.op_graph`), built once per shape: the planner prices the
    same schedule with many stage times. Returns (lanes, cross-rank deps, F&B pair members)."""
    sched = build_schedule(schedule, p, m, num_chunks=v if schedule == "interleaved_1f1b" else 1)
    split = schedule in ("zb_h1", "dualpipe", "dualpipev")
    lanes = op_graph(sched, t_f=1.0, t_b=2.0, t_w=1.0 if split else None, t_comm=1.0)
    cross = {op.key: tuple((k, d > 0) for k, d in op.deps) for ops in lanes.values() for op in ops}
    return lanes, cross, frozenset(sched.overlapped) | frozenset(sched.overlapped.values())


@lru_cache(maxsize=4096)
def _simulated(
    schedule: str, p: int, m: int, v: int, t_f: tuple, t_b: tuple, r_c: float, r_fb: float
) -> float:
    """Makespan in the units of the normalized stage times: every op priced at its own stage's time."""
    lanes, cross, pairs = _graph(schedule, p, m, v)
    for ops in lanes.values():
        for op in ops:
            a, s = op.key, op.key.stage % len(t_f)
            f, b = t_f[s], t_b[s]
            cost = {"F": f, "B": b, "I": b / 2, "W": b / 2}[a.kind]
            op.duration = cost * (r_fb if a in pairs else 1.0)
            op.deps = tuple((k, r_c if x else 0.0) for k, x in cross[a])
    done = sim.run(lanes)
    return max(op.end for op in done.values())


def _round(xs) -> tuple:
    return tuple(float(f"{x:.10g}") for x in xs)


def _closed_form(schedule, p, m, v, t_f, t_b, t_comm, fb: float = 1.0) -> float:
    T = [f + b for f, b in zip(t_f, t_b)]
    W = _rank_work(schedule, p, T)
    sends = 2 * (p - 1) * t_comm
    if schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        return m * max(W) + (sum(W) - max(W)) / (len(T) // p) + sends
    if schedule == "zb_h1":  # the drain's backwards wait only for their I half
        return m * max(W) + sum(t_f) - max(t_f) + sends
    f, b = max(t_f) * len(T) / p / 2, max(t_b) * len(T) / p / 2  # one chunk's F and B
    return fb * m * max(W) + (p / 2 - 1) * (fb * (f + b) + b - 1.5 * b) + sends  # F&B pairs cost fb(F + B)


def pipeline_makespan(
    schedule: str,
    p: int,
    m: int,
    v: int,
    t_f,
    t_b,
    t_comm: float = 0.0,
    use_simulator: bool = True,
    t_fb_ratio: float = 1.0,
) -> tuple[float, float]:
    """(makespan in seconds, bubble fraction = idle share of the busiest rank's time).

    `t_f`, `t_b`: per-micro-batch times of each (virtual) stage, in chain order (lists of
    length p·v, or 2p for DualPipe), or one number for equal stages (the time of a whole
    rank's share: each of its v chunks then takes 1/v of it). `t_fb_ratio`: an overlapped F&B
    pair of DualPipe costs this fraction of F + B (1: no overlap)."""
    schedule = SCHEDULE_ALIASES.get(schedule, schedule)
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"schedule must be one of {PIPELINE_SCHEDULES}, got {schedule!r}")
    S = _stages_of(schedule, p, v)
    if isinstance(t_f, (int, float)):
        k = S // p
        t_f, t_b = [t_f / k] * S, [t_b / k] * S
    t_f, t_b = list(t_f), list(t_b)
    if len(t_f) != S or len(t_b) != S:
        raise ValueError(
            f"{schedule} with p={p}, v={v} has {S} stages; got {len(t_f)} and {len(t_b)} stage times"
        )
    if p == 1:
        return m * sum(t_f + t_b), 0.0
    work = m * max(_rank_work(schedule, p, [f + b for f, b in zip(t_f, t_b)]))
    if not use_simulator:
        span = _closed_form(schedule, p, m, v, t_f, t_b, t_comm, t_fb_ratio)
        return span, max(0.0, 1 - work / span)
    unit = max(f + b for f, b in zip(t_f, t_b))
    args = (
        v,
        _round(x / unit for x in t_f),
        _round(x / unit for x in t_b),
        float(f"{t_comm / unit:.10g}"),
        float(f"{t_fb_ratio:.10g}"),
    )
    lo_m = p if schedule in ("gpipe", "1f1b", "interleaved_1f1b") else 2 * p
    if m <= 2 * lo_m:
        span = _simulated(schedule, p, m, *args) * unit
    else:  # steady state: each further micro-batch adds the same time (a line through lo_m and 2 lo_m)
        lo, hi = _simulated(schedule, p, lo_m, *args), _simulated(schedule, p, 2 * lo_m, *args)
        span = (hi + (m - 2 * lo_m) * (hi - lo) / lo_m) * unit
    return span, max(0.0, 1 - work / span)
