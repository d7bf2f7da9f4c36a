"""Where the student's code runs: a rank of a case's launch, with the exercise's forbidden
functions disabled, and failures turned into messages that show the student's own lines.

Everything here runs in the child processes `check` launches, except the message helpers
(`is_student_file`, `place`, `waits`), which the checking process uses on the reports that come
back (a traceback, or the runtime's stacks of a deadline or a deadlock).
"""

from __future__ import annotations

import builtins
import json
import linecache
import os
import re
import sysconfig
import traceback
from contextlib import contextmanager

import torch

__all__ = [
    "NotYet",
    "UsedReference",
    "student",
    "child",
    "outcome",
    "waits",
    "last_line",
    "student_frames",
    "is_student_file",
    "place",
]


class NotYet(Exception):
    """Raise from an unfinished solution (the student copy's placeholder does)."""


class UsedReference(BaseException):
    """Raised by a package function the exercise forbids. A BaseException, so that a student's
    `except Exception` cannot swallow it (and `_forbid` notices even if one does)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name} is disabled while your solution is checked")


# ----------------------------------------------------------------------------- the child side
class _Outcome(Exception):
    """Carries a classified failure of student code out of a rank as one JSON line."""


_called: list = []  # forbidden functions called in this process (even if the student swallowed the raise)
_active: list = []  # the exercise this (child) process checks


def child(ex, solution, case):
    """One rank of a case: the exercise's run function (by default, the solution on the case's
    arguments). A failure of the student's code leaves as an `_Outcome`."""
    _active[:] = [ex]
    return (ex.run or _call)(solution, case)


def _call(solution, case):
    """The default run: the student's function on the case's arguments."""
    return student(solution, *case.args)


def student(solution, *args, **kwargs):
    """Call the student's `solution` with the exercise's forbidden functions disabled; a failure
    leaves this rank as an `_Outcome` (not yet, forbidden, or raised with the student's lines)."""
    ex = _active[0] if _active else None
    _called.clear()
    try:
        with _forbid(ex.forbidden if ex else ()):
            out = solution(*args, **kwargs)
    except NotYet:
        raise _Outcome(json.dumps({"kind": "notyet"})) from None
    except UsedReference as e:
        raise _Outcome(json.dumps({"kind": "forbidden", "name": e.name})) from None
    except _Outcome:
        raise
    except BaseException as e:  # noqa: BLE001 - everything the student's code raises is reported
        raise _Outcome(
            json.dumps(
                {
                    "kind": "raised",
                    "error": last_line("".join(traceback.format_exception_only(type(e), e))),
                    "frames": student_frames(e.__traceback__),
                }
            )
        ) from None
    if _called:
        raise _Outcome(json.dumps({"kind": "forbidden", "name": _called[0]}))
    return out


def _qualname(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _used(name: str):
    _called.append(name)
    raise UsedReference(name)


def _raiser(fn):
    """A code object that raises UsedReference(fn's name), with as many free variables as fn's
    (a function's code can only be swapped for one with the same number). It runs with fn's
    globals, so it reaches `_used` through the `__import__` builtin."""
    label, nfree = _qualname(fn), len(fn.__code__.co_freevars)
    names = [f"_v{i}" for i in range(nfree)]
    src = "def _outer():\n" + "".join(f"    {v} = None\n" for v in names)
    src += "    def forbidden(*args, **kwargs):\n"
    if names:
        src += f"        ({', '.join(names)},)\n"
    src += f"        __import__({__name__!r}, fromlist=['_used'])._used({label!r})\n    return forbidden\n"
    ns: dict = {}
    exec(compile(src, f"<disabled {label}>", "exec"), ns)  # noqa: S102 - our own generated source
    return ns["_outer"]().__code__


@contextmanager
def _forbid(functions):
    """Swap the code of each function for a raise. Every reference to the function object (a
    module attribute, a name imported before, a lambda around it) reaches the raise."""
    saved = []
    try:
        for fn in functions:
            saved.append((fn, fn.__code__))
            fn.__code__ = _raiser(fn)
        yield
    finally:
        for fn, code in saved:
            fn.__code__ = code


# ----------------------------------------------------------------------------- messages
_LIBS = tuple(
    os.path.realpath(p)
    for p in {
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        os.path.dirname(torch.__file__),
    }
)


def is_student_file(filename: str) -> bool:
    """Code that is neither minipar's, nor torch's, nor the standard library's: a notebook cell,
    a submission, a test's own wrong answer."""
    if not filename or filename.startswith("<frozen") or filename.startswith("<disabled"):
        return False
    real = os.path.realpath(filename) if os.path.exists(filename) else filename
    return not real.startswith(_LIBS)


def place(filename: str, lineno) -> str:
    """'cell In [12], line 7' for a notebook cell, else 'file.py, line 7'."""
    ip = getattr(builtins, "get_ipython", None)
    if ip is not None:
        try:
            kind, name = ip().compile.format_code_name(filename) or (None, None)
        except Exception:  # noqa: BLE001 - an older IPython: fall back to the file name
            kind = None
        if kind:
            return f"cell {name}, line {lineno}"
    return f"{filename}, line {lineno}"


def student_frames(tb) -> str:
    """The student's own lines of a traceback (and the package line they called into, if the
    error was raised there), innermost last."""
    frames = traceback.extract_tb(tb)
    mine = [f for f in frames if is_student_file(f.filename)]
    mine = [
        f
        for i, f in enumerate(mine)  # a comprehension's frame repeats its line: once is enough
        if i == 0 or (f.filename, f.lineno) != (mine[i - 1].filename, mine[i - 1].lineno)
    ]
    lines = [f"  {place(f.filename, f.lineno)}, in {f.name}: {(f.line or '').strip()}" for f in mine]
    if frames and not is_student_file(frames[-1].filename) and mine:
        f = frames[-1]
        lines.append(f"  (raised inside {os.path.basename(f.filename)}, line {f.lineno}, in {f.name})")
    return "\n".join(lines)


_FRAME = re.compile(r'File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>\S+)')


def waits(e) -> str:
    """Per rank: what it was waiting for (runtime's `where`) and the student's own line there."""
    parts = []
    stacks = getattr(e, "stacks", {}) or {}
    where = getattr(e, "where", {}) or {}
    for r in sorted(set(stacks) | set(where)):
        m = re.match(r"(?:waiting in (?P<what>.*?))?(?:, )?(?:at (?P<at>.*))?$", where.get(r, ""))
        frames = [f.groupdict() for f in _FRAME.finditer(stacks.get(r, ""))]  # innermost first
        mine = next((f for f in frames if is_student_file(f["file"])), None)
        text = f"rank {r} was" + (f" waiting in {m['what']}" if m and m["what"] else "")
        if mine:
            text += (
                f" at {place(mine['file'], mine['line'])}, in {mine['func']}: "
                f"{_source_line(mine['file'], int(mine['line']))}"
            )
        elif m and m["at"]:
            text += f" at {_short(m['at'])}"
        parts.append(text)
    return "".join(f"\n  {p}" for p in parts)


def _short(where: str) -> str:
    m = re.match(r"(?P<file>.*):(?P<line>\d+) in (?P<func>.*)", where)
    if not m:
        return where
    if is_student_file(m["file"]):
        return f"{place(m['file'], m['line'])} in {m['func']}"
    return f"{os.path.basename(m['file'])}:{m['line']} in {m['func']}"


def _source_line(filename: str, lineno: int) -> str:
    return linecache.getline(filename, lineno).strip()


def outcome(tb: str) -> dict | None:
    for line in reversed(tb.strip().splitlines()):
        if "_Outcome: " in line:
            return json.loads(line.split("_Outcome: ", 1)[1])
    return None


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else text
