"""`python -m minipar.grade SUBMISSION... --out grades.csv`: the command line (see the package)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..exercises import EXERCISES, load_all
from ..validation import ArgumentParser, Float, Int, Problems, exit_on_error
from . import SUFFIXES, extract, grade, write_csv, write_feedback
from . import __doc__ as DOC


def _students(paths, p: Problems) -> dict:
    students: dict = {}
    for path in paths:
        if not os.path.exists(path):
            p.add(f"{path}: no such file or folder")
            continue
        if os.path.isdir(path):
            name = os.path.basename(os.path.normpath(path))
            files = sorted(
                os.path.join(root, f)
                for root, dirs, fs in os.walk(path)
                for f in fs
                if f.endswith(SUFFIXES) and ".ipynb_checkpoints" not in root
            )
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
    ap = ArgumentParser(
        prog="python -m minipar.grade", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "submissions", nargs="+", metavar="SUBMISSION", help="a student's notebook, .py file, or folder"
    )
    ap.add_argument("--out", required=True, help="the CSV to write (one row per student)")
    ap.add_argument("--feedback", default=None, help="folder of per-student feedback (default: beside --out)")
    ap.add_argument(
        "--exercise",
        action="append",
        default=None,
        help="grade only this exercise (repeatable); default: every exercise any submission answers",
    )
    ap.add_argument(
        "--seed",
        type=Int,
        default=None,
        help="seed of the randomized cases (default: "
        "MINIPAR_EXERCISE_SEED, else 0); pick one the students do not know",
    )
    ap.add_argument(
        "--jobs", type=Int, default=max(1, min(4, os.cpu_count() or 1)), help="students graded at once"
    )
    ap.add_argument(
        "--deadline-scale",
        type=Float,
        default=1.0,
        help="multiply every case's deadline (a slow or crowded machine: 2)",
    )
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
    exercises = a.exercise or sorted(
        {n for files in students.values() for f in files for n in extract(f).answers}
    )
    if not exercises:
        p.add(
            'no submission answers any exercise (no check("name", function) call and no exercise\'s function '
            "name); name the exercise with --exercise"
        )
        p.raise_if_any("cannot grade")
    t = time.monotonic()
    results = grade(students, exercises, seed, a.jobs, a.deadline_scale)
    write_csv(a.out, results, exercises)
    for student, res in results.items():
        write_feedback(feedback, student, res, seed)
    summary = {e: sum(r[e]["passed"] for r in results.values()) for e in exercises}
    print(
        f"graded {len(results)} students in {time.monotonic() - t:.0f} s: "
        + ", ".join(f"{e} passed by {n}" for e, n in summary.items())
    )
    print(f"wrote {a.out} and {feedback}/ (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
