"""Exercise of notebook 05: write the 1F1B (PipeDream-Flush) generator."""
from __future__ import annotations

from . import Verdict, checker

CASES = [(2, 4), (4, 4), (4, 8), (3, 7), (8, 16)]


def as_schedule(actions: dict, p: int, m: int):
    """Wrap a student's {rank: [actions or "0F1" strings]} as a one-stage-per-rank Schedule."""
    from ..pp import Action, Schedule, parse_action
    acts = {r: [a if isinstance(a, Action) else parse_action(str(a)) for a in actions.get(r, [])] for r in range(p)}
    return Schedule("exercise", p, m, 1, tuple(range(p)), acts, (tuple(range(p)),) * m, tuple(range(p)))


@checker("pp_1f1b")
def check_1f1b(solution) -> Verdict:
    """`solution(p, m)` returns {rank: [actions]} (Action objects or strings like "0F1") for p ranks
    with stage r on rank r. It must validate (complete, ordered, deadlock-free), take the 1F1B
    makespan (m + p - 1)(t_f + t_b) and hold at most p - r activations on rank r."""
    from ..pp import ScheduleError, simulate, validate
    for p, m in CASES:
        got = solution(p, m)
        if not isinstance(got, dict):
            return Verdict(False, f"expected a dict rank -> list of actions, got {type(got).__name__}",
                           "return {0: ['0F0', ...], 1: [...], ...}")
        s = as_schedule(got, p, m)
        try:
            validate(s)
        except ScheduleError as e:
            return Verdict(False, f"p={p}, m={m}: not a valid schedule: {e}",
                           "every rank runs F then B for each micro-batch of its own stage, in an order "
                           "that lets the messages flow")
        r = simulate(s, 1.0, 2.0)
        want = (m + p - 1) * 3.0
        if r.makespan > want + 1e-9:
            return Verdict(False, f"p={p}, m={m}: makespan {r.makespan:g}, expected {want:g} = (m+p-1)(t_f+t_b)",
                           "start the backward of a micro-batch as soon as the last stage can; "
                           "don't wait for all forwards of the other ranks")
        for q in range(p):
            if r.peak_activations[q] > min(p - q, m):
                return Verdict(False, f"p={p}, m={m}: rank {q} holds {r.peak_activations[q]} micro-batches' "
                                      f"activations at once; 1F1B holds at most p - r = {min(p - q, m)}",
                               "warm up with p - 1 - r forwards, then alternate one forward and one backward "
                               "(GPipe runs all forwards first and holds all m)")
    return Verdict(True, f"your 1F1B validates, reaches (m+p-1)(t_f+t_b) and keeps p - r activations "
                         f"on rank r, on {len(CASES)} (p, m) cases")
