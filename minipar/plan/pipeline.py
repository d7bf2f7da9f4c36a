"""The pipeline's makespan for the planner, from the one simulator (`minipar.pp.simulate`).

A step of m micro-batches costs the simulated makespan of the schedule with the
per-micro-batch stage times t_f, t_b and a p2p time t_comm per send. Simulating
thousands of micro-batches for every candidate layout would be slow, so for m > 2p we
simulate p and 2p micro-batches and extend the line through them: once every stage is
busy, each further micro-batch adds the same time (the steady state; tests check this
against simulating all m). Results are cached on the
rounded ratios t_b/t_f and t_comm/t_f.

If `minipar.pp` is unavailable the closed forms are used (state which in the notebook):
    GPipe, 1F1B: (m + p - 1)(t_f + t_b)           (Huang 2019; Narayanan 2021 Sec. 2.2)
    interleaved: (m + (p - 1)/v)(t_f + t_b)       (Narayanan 2021 Sec. 2.2.2)
    ZB-H1:       m(t_f + t_b) + (p - 1) t_f       (Qi et al. 2024, ICLR, with W = B/2)
each plus 2(p - 1) t_comm for the sends along the fill and drain.
"""
from __future__ import annotations

from functools import lru_cache

__all__ = ["pipeline_makespan", "simulator_available"]

# planner name -> minipar.pp.build_schedule name
_SCHEDULE_NAMES = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved": "interleaved_1f1b", "zb-h1": "zb_h1"}


def simulator_available() -> bool:
    try:
        from minipar.pp import build_schedule, simulate  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=4096)
def _simulated(schedule: str, p: int, m: int, v: int, r_b: float, r_c: float) -> float:
    """Makespan in units of t_f (raises if the simulator rejects the inputs)."""
    from minipar.pp import build_schedule, simulate
    sched = build_schedule(_SCHEDULE_NAMES[schedule], p, m, num_chunks=v)
    # times are per micro-batch through the whole stage; the simulator charges each of the
    # v chunks 1/v of them. ZB-H1 splits the backward into I and W halves.
    res = simulate(sched, t_f=1.0, t_b=r_b, t_w=r_b / 2 if schedule == "zb-h1" else None, t_comm=r_c)
    return float(res.makespan)


def _closed_form(schedule: str, p: int, m: int, v: int, t_f: float, t_b: float, t_comm: float) -> float:
    work = m * (t_f + t_b)
    fill = {"gpipe": (p - 1) * (t_f + t_b), "1f1b": (p - 1) * (t_f + t_b),
            "interleaved": (p - 1) * (t_f + t_b) / v, "zb-h1": (p - 1) * t_f}[schedule]
    return work + fill + 2 * (p - 1) * t_comm


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def pipeline_makespan(schedule: str, p: int, m: int, v: int, t_f: float, t_b: float,
                      t_comm: float = 0.0, use_simulator: bool = True) -> tuple[float, float]:
    """(makespan in seconds, bubble fraction = idle share of the busiest stage's time)."""
    if schedule not in _SCHEDULE_NAMES:
        raise ValueError(f"schedule must be one of {sorted(_SCHEDULE_NAMES)}, got {schedule!r}")
    work = m * (t_f + t_b)
    if p == 1:
        return work, 0.0
    span = None
    if use_simulator and simulator_available():
        key = (schedule, p, v, _round(t_b / t_f), _round(t_comm / t_f))
        if m <= 2 * p:
            span = _simulated(key[0], p, m, *key[2:]) * t_f
        else:  # steady state: each further micro-batch adds the same time (fit on p and 2p)
            lo, hi = _simulated(key[0], p, p, *key[2:]), _simulated(key[0], p, 2 * p, *key[2:])
            span = (hi + (m - 2 * p) * (hi - lo) / p) * t_f
    if span is None:
        span = _closed_form(schedule, p, m, v, t_f, t_b, t_comm)
    return span, 1 - work / span
