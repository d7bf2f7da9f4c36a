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

import argparse
import ast
import csv
import linecache
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import import_module
from multiprocessing import get_context
from multiprocessing.connection import wait

import nbformat
import torch

from .exercises import EXERCISES, check, load_all
from .validation import ArgumentParser, Float, Int, Problems, exit_on_error

__all__ = ["Submission", "extract", "grade_student", "grade", "main"]

SUFFIXES = (".ipynb", ".py")
STATUS = {"wrong": "not right", "crashed": "crashed", "forbidden": "refused (calls the package's answer)",
          "deadline": "did not finish", "deadlock": "deadlock", "skipped": "not run"}


# ----------------------------------------------------------------------------- reading submissions
@dataclass
class Submission:
    """What the grader runs of one file: its definitions, cell by cell, and the exercises it answers."""
    path: str
    cells: list = field(default_factory=list)       # (filename, source) of each code cell (a .py file: one)
    answers: dict = field(default_factory=dict)     # exercise name -> function name
    notes: list = field(default_factory=list)       # what was skipped, and why
    imports: set = field(default_factory=set)       # the modules its imports name
    error: str = ""


def _is_constant(node) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _safe_def(node) -> bool:
    """A definition whose creation runs no code of the student's: no decorators (except
    staticmethod/classmethod in a class), constant defaults, plain base classes."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
        return not node.decorator_list and all(_is_constant(d) for d in defaults)
    if isinstance(node, ast.ClassDef):
        plain = all(isinstance(b, (ast.Name, ast.Attribute)) for b in node.bases) and not node.keywords
        body_ok = all(
            (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and all(
                isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in n.decorator_list)
             and all(_is_constant(d) for d in n.args.defaults))
            or (isinstance(n, ast.Assign) and _is_constant(n.value))
            or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in node.body)
        return plain and not node.decorator_list and body_ok
    return False


def _keep(node) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return _safe_def(node)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        value = node.value
        if isinstance(value, ast.Lambda):   # `f = lambda p, m: ...` defines a function too
            return all(_is_constant(d) for d in value.args.defaults)
        return _is_constant(value)
    return False


def _python(source: str) -> str:
    """A notebook cell as plain Python: IPython's magics (%matplotlib, !pip) become calls, which
    the grader then drops like any other statement."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager  # optional: only for notebooks
    except ImportError:
        return "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))
    return TransformerManager().transform_cell(source)


def _answers(tree, names: dict) -> dict:
    """check("exercise", function) calls (under any name for check), and known function names."""
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in EXERCISES and isinstance(node.args[1], ast.Name)):
            found[node.args[0].value] = node.args[1].id
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            found.setdefault(names[node.name], node.name)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id in names:
                    found.setdefault(names[t.id], t.id)
    return found


def extract(path: str) -> Submission:
    """The statements the grader runs of `path` (a notebook or a .py file), and its answers."""
    sub = Submission(path)
    names = {ex.function: ex.name for ex in EXERCISES.values()}
    try:
        if path.endswith(".ipynb"):
            nb = nbformat.read(path, as_version=4)
            cells = [(f"{path}, cell {i + 1}", _python(c.source)) for i, c in enumerate(nb.cells)
                     if c.cell_type == "code"]
        else:
            cells = [(path, open(path, encoding="utf-8").read())]
    except Exception as e:  # noqa: BLE001 - a broken file is this student's problem, not the class's
        sub.error = f"could not read {path}: {type(e).__name__}: {e}"
        return sub
    for filename, source in cells:
        try:
            tree = ast.parse(source, filename)
        except SyntaxError as e:
            sub.notes.append(f"{filename}: skipped, it is not valid Python (line {e.lineno}: {e.msg})")
            continue
        sub.answers.update(_answers(tree, names))
        for n in tree.body:
            if isinstance(n, ast.Import):
                sub.imports |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                sub.imports.add(n.module)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not _keep(n):
                sub.notes.append(f"{filename}: skipped `{n.name}`: the grader runs no decorators and no "
                                 "computed default arguments")
        sub.cells.append((filename, source))
    return sub


def _load(sub: Submission) -> dict:
    """Run the kept statements of a submission, each cell under its own name and with its own
    line numbers (registered in linecache), so that a traceback points at the student's line."""
    ns: dict = {"__name__": "submission", "__file__": sub.path}
    for filename, source in sub.cells:
        if filename != sub.path:
            lines = source.splitlines(True)
            linecache.cache[filename] = (len(source), None, lines, filename)
        module = ast.Module(body=[n for n in ast.parse(source, filename).body if _keep(n)], type_ignores=[])
        exec(compile(module, filename, "exec"), ns)  # noqa: S102 - grading runs student code, isolated
    return ns


# ----------------------------------------------------------------------------- grading
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
            ns = _load(sub)
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
        out.setdefault(name, _missing(name, "no answer found (no check call and no function named "
                                            f"`{EXERCISES[name].function}`)"))
    return out


def _kind(v) -> str:
    if v.status != "not right":
        return v.status
    first = next((c for c in v.cases if not c.passed), None)
    return STATUS.get(first.status, "not right") if first else "not right"


def _missing(name: str, why: str) -> dict:
    return {"passed": False, "status": "missing", "kind": "missing", "message": why, "hint": "",
            "points": EXERCISES[name].points, "earned": 0.0, "cases": [], "details": [], "file": "", "notes": [],
            "text": f"MISSING (0/{EXERCISES[name].points:g} points): {why}"}


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


def grade(students: dict, exercises: list[str], seed: int, jobs: int, deadline_scale: float, log=print) -> dict:
    """Grade `students` (name -> files), `jobs` at a time, each in a forked process. Returns
    name -> {exercise -> result}."""
    torch.set_num_threads(1)               # forked children must not inherit an OpenMP pool
    _warm(students)
    ctx = get_context("fork")
    todo, running, results = list(students.items()), {}, {}
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
                results[name] = data if status == "ok" else {
                    e: _missing(e, f"grading failed: {data.strip().splitlines()[-1]}") for e in exercises}
                log(_line(name, results[name], time.monotonic() - t0))
            for conn, (name, p, t0) in list(running.items()):
                if time.monotonic() - t0 > limit:
                    p.kill()
                    p.join(5)
                    running.pop(conn)
                    results[name] = {e: _missing(e, f"grading stopped after {limit:.0f} s") for e in exercises}
                    log(_line(name, results[name], time.monotonic() - t0))
    finally:
        for _, p, _ in running.values():
            p.kill()
            p.join(5)
    return results


def _line(name, res, seconds) -> str:
    parts = [f"{e} {r['earned']:g}/{r['points']:g} {r['kind']}" for e, r in res.items()]
    total = sum(r["earned"] for r in res.values())
    out_of = sum(r["points"] for r in res.values())
    return f"{name}: {total:g}/{out_of:g} ({'; '.join(parts)}) in {seconds:.1f} s"


# ----------------------------------------------------------------------------- writing
def write_csv(path: str, results: dict, exercises: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student"] + [c for e in exercises for c in (e, f"{e} status")] + ["total", "out of"])
        for student in sorted(results):
            res = results[student]
            w.writerow([student] + [c for e in exercises for c in (f"{res[e]['earned']:g}", res[e]["kind"])]
                       + [f"{sum(res[e]['earned'] for e in exercises):g}",
                          f"{sum(res[e]['points'] for e in exercises):g}"])


def write_feedback(folder: str, student: str, res: dict, seed: int) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{student}.txt")
    total, out_of = sum(r["earned"] for r in res.values()), sum(r["points"] for r in res.values())
    lines = [f"Feedback for {student}: {total:g} of {out_of:g} points", f"(randomized cases from seed {seed})", ""]
    for name, r in res.items():
        lines += [f"== {name} ({r['file'] or 'no file'}): {r['earned']:g}/{r['points']:g}", r["text"]]
        for c in r["cases"]:
            mark = "ok " if c["passed"] else "-- "
            lines.append(f"   {mark}{c['earned']:5.2f}/{c['points']:.2f}  {c['name']}"
                         + ("" if c["passed"] else f": {c['message'].splitlines()[0]}"))
        lines += [f"   note: {n}" for n in r.get("notes", [])] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- command line
def _students(paths, p: Problems) -> dict:
    students: dict = {}
    for path in paths:
        if not os.path.exists(path):
            p.add(f"{path}: no such file or folder")
            continue
        if os.path.isdir(path):
            name = os.path.basename(os.path.normpath(path))
            files = sorted(os.path.join(root, f) for root, dirs, fs in os.walk(path) for f in fs
                           if f.endswith(SUFFIXES) and ".ipynb_checkpoints" not in root)
            if not files:
                p.add(f"{path}: the folder holds no .ipynb or .py file")
                continue
        elif path.endswith(SUFFIXES):
            name, files = os.path.splitext(os.path.basename(path))[0], [path]
        else:
            p.add(f"{path}: not a notebook (.ipynb), a .py file or a folder of them")
            continue
        if name in students:
            p.add(f"{path}: a second submission for student {name!r}; put one student's files in one folder")
            continue
        students[name] = files
    return students


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m minipar.grade", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="a student's notebook, .py file, or folder")
    ap.add_argument("--out", required=True, help="the CSV to write (one row per student)")
    ap.add_argument("--feedback", default=None, help="folder of per-student feedback (default: beside --out)")
    ap.add_argument("--exercise", action="append", default=None,
                    help="grade only this exercise (repeatable); default: every exercise any submission answers")
    ap.add_argument("--seed", type=Int, default=None, help="seed of the randomized cases (default: "
                    "MINIPAR_EXERCISE_SEED, else 0); pick one the students do not know")
    ap.add_argument("--jobs", type=Int, default=max(1, min(4, os.cpu_count() or 1)), help="students graded at once")
    ap.add_argument("--deadline-scale", type=Float, default=1.0,
                    help="multiply every case's deadline (a slow or crowded machine: 2)")
    return ap


@exit_on_error
def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    load_all()
    p = Problems(cli=True)
    students = _students(a.submissions, p)
    p.output_file("out", a.out)
    feedback = a.feedback or os.path.splitext(a.out)[0] + "_feedback"
    p.output_dir("feedback", feedback)
    p.integer("jobs", a.jobs, low=1, high=64)
    p.number("deadline_scale", a.deadline_scale, low=0.0, low_open=True, high=100.0)
    if a.seed is not None:
        p.integer("seed", a.seed, low=0, high=None)
    for name in a.exercise or []:
        if name not in EXERCISES:
            p.add(f"--exercise {name!r} is not an exercise; choose from: {', '.join(sorted(EXERCISES))}")
    p.raise_if_any("cannot grade")
    seed = a.seed if a.seed is not None else int(os.environ.get("MINIPAR_EXERCISE_SEED", 0))
    exercises = a.exercise or sorted({n for files in students.values() for f in files for n in extract(f).answers})
    if not exercises:
        p.add("no submission answers any exercise (no check(\"name\", function) call and no exercise's function "
              "name); name the exercise with --exercise")
        p.raise_if_any("cannot grade")
    t = time.monotonic()
    results = grade(students, exercises, seed, a.jobs, a.deadline_scale)
    write_csv(a.out, results, exercises)
    for student, res in results.items():
        write_feedback(feedback, student, res, seed)
    summary = {e: sum(r[e]["passed"] for r in results.values()) for e in exercises}
    print(f"graded {len(results)} students in {time.monotonic() - t:.0f} s: "
          + ", ".join(f"{e} passed by {n}" for e, n in summary.items()))
    print(f"wrote {a.out} and {feedback}/ (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
