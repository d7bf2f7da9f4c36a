"""Self-grading exercises: one checker per notebook exercise.

A checker runs the student's function (on simulated ranks where it needs them)
against the reference and returns a `Verdict`: passed or not, what differs, on
which rank, and a hint. It never dumps a stack trace for a wrong answer: an
exception in the student's code becomes a verdict that names it.

Each topic's checkers live in a module of this package (`collectives`, ...);
`check(name, fn)` finds them by name.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field

__all__ = ["Verdict", "NotYet", "check", "checker", "CHECKERS", "compare"]


class NotYet(Exception):
    """Raise from an unfinished solution (the student copy's placeholder does)."""


@dataclass
class Verdict:
    passed: bool
    message: str
    hint: str = ""
    details: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = "PASSED" if self.passed else ("NOT YET" if self.message.startswith("not yet") else "NOT RIGHT")
        msg = self.message[len("not yet: "):] if self.message.startswith("not yet: ") else self.message
        s = f"{head}: {msg}"
        if self.details:
            s += "\n  " + "\n  ".join(self.details)
        if self.hint and not self.passed:
            s += f"\n  hint: {self.hint}"
        return s

    def _repr_pretty_(self, p, cycle):  # shows nicely as the last value of a notebook cell
        p.text(str(self))


CHECKERS: dict = {}


def checker(name: str):
    """Register a checker `fn(solution) -> Verdict` under `name`, and make it safe to call:
    missing solutions and exceptions in student code become verdicts."""
    def wrap(fn):
        def safe(solution=None, *args, **kwargs):
            if solution is None:
                return Verdict(False, "not yet: no solution given", "define your function and pass it in")
            if _is_stub(solution):
                return Verdict(False, "not yet: the solution still raises NotYet", "fill in the solution cell")
            try:
                return fn(solution, *args, **kwargs)
            except NotYet:
                return Verdict(False, "not yet: the solution still raises NotYet", "fill in the solution cell")
            except NotImplementedError:
                return Verdict(False, "not yet: the solution is not implemented", "fill in the solution cell")
            except Exception as e:  # noqa: BLE001 - a wrong answer is a verdict, not a crash
                if "NotYet" in getattr(e, "remote_traceback", ""):
                    return Verdict(False, "not yet: the solution still raises NotYet", "fill in the solution cell")
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                return Verdict(False, f"your code raised {last}", "read the message above; the "
                               "exercise text says what the function receives and must return")
        safe.__name__, safe.__doc__ = fn.__name__, fn.__doc__
        CHECKERS[name] = safe
        return safe
    return wrap


def _is_stub(fn) -> bool:
    """True for the placeholder of a student copy (its body raises NotYet)."""
    import inspect
    try:
        return "raise NotYet(" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def check(name: str, solution, *args, **kwargs) -> Verdict:
    """Run the checker registered as `name` (importing every topic module first)."""
    from importlib import import_module
    import pkgutil
    for m in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{m.name}")
    if name not in CHECKERS:
        raise KeyError(f"no exercise named {name!r}; known: {sorted(CHECKERS)}")
    return CHECKERS[name](solution, *args, **kwargs)


def compare(got, want, what: str, atol: float = 1e-5, rank: int | None = None) -> str | None:
    """None if `got` matches `want` (tensors or numbers), else a sentence saying how it differs."""
    import torch
    where = f" on rank {rank}" if rank is not None else ""
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got, dtype=torch.float64)
        except Exception:
            return f"{what}{where}: expected a tensor, got {type(got).__name__}"
    want = torch.as_tensor(want)
    if got.shape != want.shape:
        return f"{what}{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if err > atol:
        return f"{what}{where}: off by up to {err:.3g} (expected within {atol:g})"
    return None
