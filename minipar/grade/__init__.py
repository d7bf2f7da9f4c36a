"""Grade a class: every student's exercises, in isolated processes, under deadlines.

    python -m minipar.grade submissions/* --out grades.csv
    python -m minipar.grade alice.ipynb bob/ --out grades.csv --seed 2027 --exercise pp_1f1b

Each SUBMISSION is a student: a notebook or .py file (the student is the file's name without
its extension), or a folder of them (the student is the folder's name). From every code cell
the grader keeps only imports, function and class definitions and constants, so nothing else
a notebook does (training runs, plots) is run; then it finds the exercises by the notebook's
`check("name", function)` calls, or by the function names the exercises ask for.

Every student is graded in a separate process forked from this one, and every case of every
exercise in a process of its own under a deadline (`minipar.exercises.check`): a hang, a crash
or a monkey-patch touches nobody else. The randomized cases come from `--seed`, which students
do not know. Each exercise is worth its points, with partial credit by case.

Writes the CSV (a row per student: points and status per exercise, total) and, beside it, a
feedback file per student with every case's result and the hints.
"""

from __future__ import annotations

import os
import time
import traceback
from importlib import import_module
from multiprocessing import get_context
from multiprocessing.connection import wait

import torch

from ..exercises import EXERCISES, check, load_all
from .report import summary_line, write_csv, write_feedback
from .submissions import SUFFIXES, Submission, extract, load

__all__ = [
    "Submission",
    "extract",
    "load",
    "grade_student",
    "grade",
    "write_csv",
    "write_feedback",
    "SUFFIXES",
]

STATUS = {
    "wrong": "not right",
    "crashed": "crashed",
    "forbidden": "refused (calls the package's answer)",
    "deadline": "did not finish",
    "deadlock": "deadlock",
    "skipped": "not run",
}


def grade_student(files: list[str], exercises: list[str], seed: int, deadline_scale: float) -> dict:
    """Grade one student's files (in the calling process): exercise name -> result dict."""
    out = {}
    for path in files:
        sub = extract(path)
        if sub.error:
            for name in exercises:
                out.setdefault(name, _missing(name, sub.error))
            continue
        try:
            ns = load(sub)
        except BaseException as e:  # noqa: BLE001 - e.g. an import that fails on this machine
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            for name in sub.answers:
                out[name] = _missing(name, f"{path}: the definitions could not be loaded: {tb}")
            continue
        for name, fn_name in sub.answers.items():
            if name not in exercises or (name in out and out[name]["status"] == "passed"):
                continue
            fn = ns.get(fn_name)
            if not callable(fn):
                out[name] = _missing(name, f"{path}: `{fn_name}` is not defined as a function")
                continue
            v = check(name, fn, seed=seed, deadline_scale=deadline_scale)
            out[name] = dict(v.as_dict(), file=path, notes=sub.notes, kind=_kind(v), text=str(v))
    for name in exercises:
        out.setdefault(
            name,
            _missing(
                name, f"no answer found (no check call and no function named `{EXERCISES[name].function}`)"
            ),
        )
    return out


def _kind(v) -> str:
    if v.status != "not right":
        return v.status
    first = next((c for c in v.cases if not c.passed), None)
    return STATUS.get(first.status, "not right") if first else "not right"


def _missing(name: str, why: str) -> dict:
    return {
        "passed": False,
        "status": "missing",
        "kind": "missing",
        "message": why,
        "hint": "",
        "points": EXERCISES[name].points,
        "earned": 0.0,
        "cases": [],
        "details": [],
        "file": "",
        "notes": [],
        "text": f"MISSING (0/{EXERCISES[name].points:g} points): {why}",
    }


def _child(conn, files, exercises, seed, deadline_scale):
    try:
        conn.send(("ok", grade_student(files, exercises, seed, deadline_scale)))
    except BaseException:  # noqa: BLE001 - report, never hang the parent
        conn.send(("err", traceback.format_exc()))
    conn.close()
    os._exit(0)


def _budget(exercises, deadline_scale) -> float:
    """The most one student may take: every case of every exercise to its deadline, plus start-up."""
    return 30.0 + sum(ex.deadline * deadline_scale * 12 for n, ex in EXERCISES.items() if n in exercises)


def _warm(students: dict) -> None:
    """Import here, once, the installed modules the submissions import (matplotlib, ipywidgets,
    minipar's modules), so that every forked student process starts with them loaded instead
    of importing them again (seconds each). A module that does not import is left to the
    student's process, which reports it."""
    # torch._dynamo: `launch` imports it at its first call in a process, which takes seconds
    named = {m for files in students.values() for f in files for m in extract(f).imports}
    for module in ["torch._dynamo", *sorted(named)]:
        try:
            import_module(module)
        except Exception:  # noqa: BLE001 - the student's process will say what failed
            pass


def grade(
    students: dict, exercises: list[str], seed: int, jobs: int, deadline_scale: float, log=print
) -> dict:
    """Grade `students` (name -> files), `jobs` at a time, each in a forked process. Returns
    name -> {exercise -> result}."""
    load_all()
    torch.set_num_threads(1)  # forked children must not inherit an OpenMP pool
    _warm(students)
    ctx = get_context("fork")
    todo, running, results, retried = list(students.items()), {}, {}, set()
    limit = _budget(exercises, deadline_scale)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, files = todo.pop(0)
                parent, child = ctx.Pipe(duplex=False)
                # not a daemon: it launches ranks of its own; the finally below ends it if we stop early
                p = ctx.Process(target=_child, args=(child, files, exercises, seed, deadline_scale))
                p.start()
                child.close()
                running[parent] = (name, p, time.monotonic())
            for conn in wait(list(running), timeout=1.0):
                name, p, t0 = running.pop(conn)
                try:
                    status, data = conn.recv()
                except EOFError:
                    status, data = "err", f"the grading process died (exit code {p.exitcode})"
                p.join(5)
                if status != "ok" and name not in retried:
                    # the grader's own failure (a student's code cannot cause one: every case runs
                    # in processes of its own), e.g. a machine out of ports: grade them again
                    retried.add(name)
                    todo.insert(0, (name, students[name]))
                    continue
                results[name] = (
                    data
                    if status == "ok"
                    else {
                        e: _missing(e, f"grading failed: {data.strip().splitlines()[-1]}") for e in exercises
                    }
                )
                log(summary_line(name, results[name], time.monotonic() - t0))
            for conn, (name, p, t0) in list(running.items()):
                if time.monotonic() - t0 > limit:
                    p.kill()
                    p.join(5)
                    running.pop(conn)
                    results[name] = {
                        e: _missing(e, f"grading stopped after {limit:.0f} s") for e in exercises
                    }
                    log(summary_line(name, results[name], time.monotonic() - t0))
    finally:
        for _, p, _ in running.values():
            p.kill()
            p.join(5)
    return results
