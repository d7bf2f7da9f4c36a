"""Exercise of notebook 05: write the 1F1B (PipeDream-Flush) generator.

`my_1f1b(p, m)` returns {rank: [actions]} (`pp.Action`s or strings like "0F1") for p ranks,
stage r on rank r. It must validate (complete, ordered, deadlock-free), take the 1F1B makespan
(m + p - 1)(t_f + t_b) (Narayanan et al. 2021, Sec. 2.2.1) and hold at most p - r micro-batches'
activations on rank r. The package's own generators are disabled while it runs.
"""

from __future__ import annotations

from ..pp import Action, Schedule, ScheduleError, build_schedule, parse_action, schedules, simulate, validate
from . import Case, Exercise, exercise, student

FIXED = [(2, 4), (4, 4), (4, 8), (3, 7), (8, 16), (4, 2)]


def _cases(rng):
    fixed = [Case(f"p={p}, m={m}", (p, m)) for p, m in FIXED]
    drawn = []
    while len(drawn) < 3:
        pm = (rng.randint(2, 8), rng.randint(1, 24))
        if pm not in drawn and pm not in FIXED:
            drawn.append(pm)
    return fixed + [Case(f"random case p={p}, m={m}", (p, m), random=True) for p, m in drawn]


def _run(solution, case):
    got = student(solution, *case.args)
    if not isinstance(got, dict):
        return type(got).__name__
    return {int(r): [str(a) for a in acts] for r, acts in got.items()}


def as_schedule(actions: dict, p: int, m: int) -> Schedule:
    """Wrap a student's {rank: [actions or "0F1" strings]} as a one-stage-per-rank Schedule."""
    acts = {
        r: [a if isinstance(a, Action) else parse_action(str(a)) for a in actions.get(r, [])]
        for r in range(p)
    }
    return Schedule("exercise", p, m, 1, tuple(range(p)), acts, (tuple(range(p)),) * m, tuple(range(p)))


def _judge(case, outputs):
    (p, m), got = case.args, outputs[0]
    if not isinstance(got, dict):
        return (
            f"expected a dict rank -> list of actions, got {got}",
            "return {0: ['0F0', ...], 1: [...], ...}",
        )
    try:
        s = as_schedule(got, p, m)
        validate(s)
    except (ScheduleError, ValueError) as e:
        return (
            f"not a valid schedule: {e}",
            "every rank runs F then B for each micro-batch of its own stage, "
            "in an order that lets the messages flow",
        )
    r = simulate(s, 1.0, 2.0)
    want = (m + p - 1) * 3.0
    if r.makespan > want + 1e-9:
        return (
            f"makespan {r.makespan:g}, expected {want:g} = (m+p-1)(t_f+t_b)",
            "start the backward of a micro-batch as soon as the last stage can; don't wait for all "
            "forwards of the other ranks",
        )
    for q in range(p):
        if r.peak_activations[q] > min(p - q, m):
            return (
                f"rank {q} holds {r.peak_activations[q]} micro-batches' activations at once; 1F1B holds at "
                f"most p - r = {min(p - q, m)}",
                "warm up with p - 1 - r forwards, then alternate one forward "
                "and one backward (GPipe runs all forwards first and holds all m)",
            )
    return None


exercise(
    Exercise(
        name="pp_1f1b",
        notebook="05_pipeline_parallel",
        function="my_1f1b",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(build_schedule, *dict.fromkeys(schedules._GEN.values())),
        reveals=("_one_f_one_b",),
        deadline=10.0,
        summary="your 1F1B validates, reaches (m+p-1)(t_f+t_b) and keeps p - r activations on rank r",
    )
)
