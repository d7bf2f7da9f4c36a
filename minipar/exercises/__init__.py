"""Self-grading exercises: one checker per notebook exercise.

An exercise is a list of **cases** (fixed ones, plus randomized ones drawn from a seed the
instructor controls) and a **judge**. `check(name, solution)`:

1. runs the solution on each case in a separate process, under a deadline (`launch(...,
   deadline=)`; on simulated ranks where the exercise needs them), with the package functions
   the answer is compared with disabled: their code is swapped for a `raise`, so a solution
   that calls them is refused and told why. A hang becomes "did not finish within N s" with
   the line each rank was waiting on; a send/recv cycle becomes "deadlock";
2. judges each case's output here, against the package's own implementation or a formula;
3. returns a `Verdict`: PASSED, NOT RIGHT (the first failing case: what differs, a hint, and
   for a crash the student's own traceback lines) or NOT YET (the function raised `NotYet`
   when called). Every case carries points, so a partly right answer earns partial credit.

The seed of the randomized cases is `check(..., seed=)`, else the environment's
`MINIPAR_EXERCISE_SEED`, else 0: students practise on seed 0, and the instructor grades with
another one (`python -m minipar.grade --seed`), so no answer can be fitted to the cases.

Each topic's exercises live in a module of this package (`collectives`, `pp`, ...); `check`
imports them all and finds an exercise by name.
"""

from __future__ import annotations

import os
import pkgutil
import random
from dataclasses import dataclass, field
from importlib import import_module
from typing import Callable

import torch

from ..runtime import DeadlineExceeded, Deadlock, RankError, launch
from ._sandbox import NotYet, UsedReference, child, last_line, outcome, student, waits

__all__ = [
    "Verdict",
    "CaseResult",
    "Case",
    "Exercise",
    "NotYet",
    "UsedReference",
    "check",
    "exercise",
    "EXERCISES",
    "CHECKERS",
    "compare",
    "student",
    "load_all",
    "seed_from_env",
]

DEFAULT_SEED = 0


# ----------------------------------------------------------------------------- data
@dataclass
class Case:
    """One input of an exercise. `args` go to the run function on every rank (picklable);
    `world_size` ranks run it; `expect` is whatever the judge needs; `random` marks a case
    drawn from the seed."""

    name: str
    args: tuple = ()
    world_size: int = 1
    points: float = 1.0
    random: bool = False
    expect: object = None


@dataclass
class CaseResult:
    name: str
    passed: bool
    points: float
    earned: float
    message: str = ""
    hint: str = ""
    status: str = "passed"  # passed, wrong, crashed, forbidden, deadline, deadlock, not yet, skipped


@dataclass
class Verdict:
    passed: bool
    message: str
    hint: str = ""
    details: list = field(default_factory=list)
    points: float = 0.0  # what the exercise is worth
    earned: float = 0.0  # what this solution earned (partial credit by case)
    cases: list = field(default_factory=list)  # CaseResult per case
    status: str = ""  # passed, not right, not yet

    def __post_init__(self):
        if not self.status:
            self.status = (
                "passed"
                if self.passed
                else ("not yet" if self.message.startswith("not yet") else "not right")
            )

    def __bool__(self) -> bool:
        return self.passed

    @property
    def head(self) -> str:
        return {"passed": "PASSED", "not yet": "NOT YET"}.get(self.status, "NOT RIGHT")

    def __str__(self) -> str:
        msg = self.message[len("not yet: ") :] if self.message.startswith("not yet: ") else self.message
        score = f" ({self.earned:g}/{self.points:g} points)" if self.points else ""
        s = f"{self.head}{score}: {msg}"
        if self.details:
            s += "\n  " + "\n  ".join(self.details)
        if self.hint and not self.passed:
            s += f"\n  hint: {self.hint}"
        return s

    def _repr_pretty_(self, p, cycle):  # shows nicely as the last value of a notebook cell
        p.text(str(self))

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "status": self.status,
            "message": self.message,
            "hint": self.hint,
            "points": self.points,
            "earned": self.earned,
            "details": list(self.details),
            "cases": [vars(c) for c in self.cases],
        }


@dataclass
class Exercise:
    """What a notebook's exercise is and how it is checked.

    cases(rng) -> [Case]   fixed cases first, then randomized ones drawn from `rng` (random.Random)
    run(solution, case)    on every rank of the case, in a child process: prepares the inputs, calls
                           `student(solution, ...)`, returns plain data for the judge
    judge(case, outputs)   here, with one output per rank: None if right, else (message, hint)
    forbidden              package functions the answer may not call (each is made to raise)
    reveals                names whose source is the answer: student copies must not show them
    """

    name: str
    notebook: str
    function: str
    cases: Callable
    judge: Callable
    run: Callable = None
    forbidden: tuple = ()
    reveals: tuple = ()
    deadline: float = 10.0
    points: float = 10.0
    summary: str = ""
    crash_hint: str = "read the lines above: they are where your code failed"

    def forbidden_names(self) -> list[str]:
        return [f"{f.__module__}.{f.__qualname__}" for f in self.forbidden]


EXERCISES: dict[str, Exercise] = {}
CHECKERS = EXERCISES  # the old name


def exercise(ex: Exercise) -> Exercise:
    """Register an exercise (a topic module calls this at import)."""
    EXERCISES[ex.name] = ex
    return ex


def load_all() -> dict[str, Exercise]:
    """Import every topic module of this package, registering their exercises."""
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            import_module(f"{__name__}.{m.name}")
    return EXERCISES


def seed_from_env(seed: int | None = None) -> int:
    if seed is not None:
        return int(seed)
    return int(os.environ.get("MINIPAR_EXERCISE_SEED", DEFAULT_SEED))


# ----------------------------------------------------------------------------- checking
def check(
    name: str, solution, seed: int | None = None, deadline_scale: float = 1.0, first_failure: bool = False
) -> Verdict:
    """Check `solution` against exercise `name` (see the module docstring). `seed` draws the
    randomized cases; `deadline_scale` stretches every case's deadline (a slow machine);
    `first_failure` skips the cases after the first wrong one (quicker, no partial credit)."""
    load_all()
    if name not in EXERCISES:
        raise KeyError(f"no exercise named {name!r}; known: {sorted(EXERCISES)}")
    ex = EXERCISES[name]
    if solution is None:
        return Verdict(
            False, "not yet: no solution given", "define your function and pass it in", points=ex.points
        )
    if not callable(solution):
        return Verdict(
            False,
            f"expected a function, got {type(solution).__name__}",
            f"pass the function itself: check({name!r}, {ex.function})",
            points=ex.points,
        )
    seed = seed_from_env(seed)
    cases = ex.cases(random.Random(f"{name}:{seed}"))
    total = sum(c.points for c in cases)
    results: list[CaseResult] = []
    stop = None
    for case in cases:
        share = ex.points * case.points / total
        if stop:
            results.append(CaseResult(case.name, False, share, 0.0, f"not run: {stop}", status="skipped"))
            continue
        res = _run_case(ex, solution, case, ex.deadline * deadline_scale, share)
        if res.status == "not yet":
            return Verdict(
                False,
                "not yet: the function raised NotYet when called",
                "write the function's body in its cell, run that cell, then this one",
                points=ex.points,
                cases=[res],
            )
        if res.status in ("deadline", "deadlock"):
            stop = "an earlier case did not finish"
        elif res.status == "forbidden":
            stop = "the solution calls a disabled function"
        elif first_failure and not res.passed:
            stop = "an earlier case failed"
        results.append(res)
    earned = round(sum(r.earned for r in results), 2)
    failed = [r for r in results if not r.passed]
    n_rand = sum(c.random for c in cases)
    tally = f"{len(results) - len(failed)} of {len(results)} cases" + (
        f" ({n_rand} randomized, seed {seed})" if n_rand else ""
    )
    if not failed:
        return Verdict(
            True,
            (ex.summary or "every case matches") + f"; {tally}",
            points=ex.points,
            earned=ex.points,
            cases=results,
        )
    first = failed[0]
    details = [f"passed {tally}"]
    seen = {first.message.splitlines()[0]}
    for r in failed[1:]:
        line = r.message.splitlines()[0]
        if r.status != "skipped" and line not in seen and len(details) < 4:
            details.append(f"also wrong: {r.name}: {line}")
        seen.add(line)
    return Verdict(
        False,
        f"{first.name}: {first.message}",
        first.hint,
        details,
        points=ex.points,
        earned=earned,
        cases=results,
    )


def _run_case(ex: Exercise, solution, case: Case, deadline: float, share: float) -> CaseResult:
    def fail(message, hint="", status="wrong"):
        return CaseResult(case.name, False, share, 0.0, message, hint, status)

    try:
        outputs = launch(
            child, case.world_size, ex, solution, case, deadline=deadline, timeout=max(deadline, 5.0)
        )
    except Deadlock as e:
        head = str(e).splitlines()[0].rstrip(":").strip() if str(e) else "deadlock"
        return fail(
            f"{head}:{waits(e)}",
            "every rank is waiting for a message that no rank sends: post each "
            "step's send and receive together (comm.batch_p2p), or order them so that one side "
            "receives first",
            "deadlock",
        )
    except DeadlineExceeded as e:
        return fail(
            f"did not finish within {deadline:g} s:{waits(e)}",
            "look at the line named above: a loop that never ends, or a wait for something that never comes",
            "deadline",
        )
    except RankError as e:
        out = outcome(e.remote_traceback)
        if out is None:
            return fail(f"rank {e.rank} failed: {last_line(e.remote_traceback)}", ex.crash_hint, "crashed")
        if out["kind"] == "notyet":
            return CaseResult(case.name, False, share, 0.0, "not yet", status="not yet")
        if out["kind"] == "forbidden":
            return fail(
                f"your solution calls {out['name']}, the package's own implementation that this "
                "exercise is compared with; the checker runs your code with it disabled",
                "write it yourself: reading the package's source is fine, calling it is not",
                "forbidden",
            )
        where = f" on rank {e.rank}" if case.world_size > 1 else ""
        return fail(
            f"your code raised {out['error']}{where}" + (f"\n{out['frames']}" if out["frames"] else ""),
            ex.crash_hint,
            "crashed",
        )
    try:
        verdict = ex.judge(case, outputs)
    except Exception as err:  # noqa: BLE001 - an output the judge cannot read is a wrong answer
        return fail(
            f"the checker could not read what your function returned ({type(err).__name__}: {err})",
            "return exactly what the exercise text asks for",
        )
    if verdict is None:
        return CaseResult(case.name, True, share, share)
    message, hint = verdict if isinstance(verdict, tuple) else (verdict, "")
    return fail(message, hint)


# ----------------------------------------------------------------------------- helpers for judges
def compare(got, want, what: str, atol: float = 1e-5, rank: int | None = None) -> str | None:
    """None if `got` matches `want` (tensors or numbers), else a sentence saying how it differs."""
    where = f" on rank {rank}" if rank is not None else ""
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got, dtype=torch.float64)
        except Exception:  # noqa: BLE001
            return f"{what}{where}: expected a tensor, got {type(got).__name__}"
    want = torch.as_tensor(want)
    if got.shape != want.shape:
        return f"{what}{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.numel() and not torch.isfinite(got.double()).all() and torch.isfinite(want.double()).all():
        return f"{what}{where}: contains inf or nan"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if err > atol:
        return f"{what}{where}: off by up to {err:.3g} (expected within {atol:g})"
    return None
