"""`python -m minipar.grade` on a class of fake submissions: right, wrong, hanging, crashing and
cheating answers, as notebooks (the real student copy of notebook 05, filled in), .py files and
per-student folders. Every student must get the verdict and points their answer deserves, with
a feedback file that says why, and bad command lines must be refused with one line per problem."""

from __future__ import annotations

import csv
import os
import sys
import time

import nbformat
import pytest

import minipar.grade as grader
from minipar.grade import extract, load
from minipar.grade.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_student_copies as msc  # noqa: E402 - a script beside the tests' package

PP_RIGHT = open(os.path.join(ROOT, "instructor", "solutions", "05_pipeline_parallel.py")).read()
MOE_RIGHT = open(os.path.join(ROOT, "instructor", "solutions", "07_moe_expert_parallel.py")).read()

PP = {  # the exercise cell of notebook 05, as students fill it in: (code, status, points)
    "right": (PP_RIGHT, "passed", 10),
    "right_with_stub_left_below": (
        PP_RIGHT.replace("    return out", "    return out\n    raise NotYet('x')"),
        "passed",
        10,
    ),
    "gpipe": (
        "def my_1f1b(p, m):\n    return {r: [f'{r}F{i}' for i in range(m)] + [f'{r}B{i}' for i in range(m)]"
        " for r in range(p)}\n",
        "not right",
        None,
    ),  # right only where m = 1
    "one_warmup_too_many": (PP_RIGHT.replace("min(p - 1 - r, m)", "min(p - r, m)"), "not right", None),
    "no_min_for_few_microbatches": (PP_RIGHT.replace("min(p - 1 - r, m)", "p - 1 - r"), "not right", None),
    "spins": ("def my_1f1b(p, m):\n    while True:\n        pass\n", "did not finish", 0),
    "sleeps": ("import time\n\ndef my_1f1b(p, m):\n    time.sleep(3600)\n", "did not finish", 0),
    "name_error": ("def my_1f1b(p, m):\n    return {r: actions[r] for r in range(p)}\n", "crashed", 0),
    "divides_by_zero": ("def my_1f1b(p, m):\n    warm = p // (m - m)\n    return {}\n", "crashed", 0),
    "lambda_over_the_package": (
        "from minipar.pp import build_schedule\n\n"
        "my_1f1b = lambda p, m: build_schedule('1f1b', p, m).actions\n",
        "refused",
        0,
    ),
    "imports_the_generator": (
        "from minipar.pp.schedules import _one_f_one_b\n\n"
        "def my_1f1b(p, m):\n    return _one_f_one_b(p, m, 1).actions\n",
        "refused",
        0,
    ),
    "swallows_the_refusal": (
        "from minipar.pp import build_schedule\n\ndef my_1f1b(p, m):\n    try:\n"
        "        return build_schedule('1f1b', p, m).actions\n    except BaseException:\n"
        "        return {}\n",
        "refused",
        0,
    ),
    "untouched_copy": (None, "not yet", 0),
}
MOE = {  # .py files answering notebook 07's exercise
    "moe_right": (MOE_RIGHT, "passed", 10),
    "moe_no_capacity": (MOE_RIGHT.replace("slot < capacity", "slot >= 0"), "not right", None),
    "moe_bincount_2d": (
        "import torch\n\ndef my_topk_route(probs, k, capacity):\n    w, i = probs.topk(k, dim=-1)\n"
        "    per_expert = torch.bincount(i)\n    return i, w, per_expert[i] < capacity\n",
        "crashed",
        0,
    ),
    "moe_assign_slots": (
        "from minipar.moe import assign_slots\n\ndef my_topk_route(probs, k, capacity):\n"
        "    w, i = probs.topk(k, dim=-1)\n    w = w / w.sum(-1, keepdim=True) if k > 1 else w\n"
        "    return i, w, assign_slots(i, probs.shape[-1]) < capacity\n",
        "refused",
        0,
    ),
    "moe_hangs": (
        "def my_topk_route(probs, k, capacity):\n    while probs is not None:\n        pass\n",
        "did not finish",
        0,
    ),
}


def _notebook(copy, code):
    nb = nbformat.from_dict(copy)
    if code is not None:
        cell = next(c for c in nb.cells if "exercise" in msc.tags(c))
        cell.source = code
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    d = tmp_path_factory.mktemp("class")
    copy = msc.student_copy(
        nbformat.read(os.path.join(ROOT, "notebooks", "05_pipeline_parallel.ipynb"), as_version=4),
        "05_pipeline_parallel",
    )
    paths = []
    for student, (code, _, _) in PP.items():
        nbformat.write(_notebook(copy, code), d / f"{student}.ipynb")
        paths.append(str(d / f"{student}.ipynb"))
    for student, (code, _, _) in MOE.items():
        (d / f"{student}.py").write_text(code)
        paths.append(str(d / f"{student}.py"))
    both = d / "both_right"  # a folder: one student, two notebooks' answers
    both.mkdir()
    nbformat.write(_notebook(copy, PP_RIGHT), both / "05_pipeline_parallel.ipynb")
    (both / "moe.py").write_text(MOE_RIGHT)
    paths.append(str(both))
    (d / "broken.ipynb").write_text("{ this is not json")
    paths.append(str(d / "broken.ipynb"))
    out = d / "grades.csv"
    t = time.time()
    assert main(paths + ["--out", str(out), "--seed", "7", "--jobs", "2", "--deadline-scale", "0.5"]) == 0
    took = time.time() - t
    rows = {r["student"]: r for r in csv.DictReader(open(out))}
    return d, rows, took


@pytest.mark.slow
def test_a_class_of_submissions_is_graded_as_it_deserves(graded):
    d, rows, took = graded
    assert len(rows) == len(PP) + len(MOE) + 2 >= 20
    for student, (_, status, points) in PP.items():
        r = rows[student]
        assert r["pp_1f1b status"].startswith(status), (student, r["pp_1f1b status"], r)
        if points is not None:
            assert float(r["pp_1f1b"]) == points, (student, r)
        else:
            assert 0 <= float(r["pp_1f1b"]) < 10, (student, r)  # partial credit by case
        assert r["moe_topk_capacity status"] == "missing" and r["out of"] == "20"
    for student, (_, status, points) in MOE.items():
        r = rows[student]
        assert r["moe_topk_capacity status"].startswith(status), (student, r)
        earned = float(r["moe_topk_capacity"])
        assert earned == points if points is not None else 0 < earned < 10, (student, r)
    assert 0 < float(rows["no_min_for_few_microbatches"]["pp_1f1b"]) < 10  # right where m >= p only
    assert rows["both_right"]["total"] == "20"
    assert rows["broken"]["total"] == "0" and rows["broken"]["pp_1f1b status"] == "missing"
    print(f"graded {len(rows)} submissions in {took:.1f} s")


@pytest.mark.slow
def test_feedback_says_why_with_the_students_own_lines(graded):
    d, rows, _ = graded
    fb = d / "grades_feedback"
    assert sorted(p[:-4] for p in os.listdir(fb)) == sorted(rows)
    spins = (fb / "spins.txt").read_text()
    assert "did not finish within 5 s" in spins and "rank 0" in spins and "spins.ipynb, cell" in spins
    assert "while True" in spins or "in my_1f1b: pass" in spins  # the loop it was stuck in
    crash = (fb / "name_error.txt").read_text()
    assert "NameError" in crash and "name_error.ipynb, cell" in crash and "actions[r]" in crash
    cheat = (fb / "lambda_over_the_package.txt").read_text()
    assert "calls minipar.pp.schedules.build_schedule" in cheat and "disabled" in cheat
    partial = (fb / "no_min_for_few_microbatches.txt").read_text()
    assert "ok " in partial and "-- " in partial and "seed 7" in partial
    assert "randomized" in (fb / "right.txt").read_text()
    assert "could not read" in (fb / "broken.txt").read_text()


def test_only_imports_definitions_and_constants_are_run():
    sub = extract(os.path.join(ROOT, "notebooks", "05_pipeline_parallel.ipynb"))
    assert sub.answers == {"pp_1f1b": "my_1f1b"} and not sub.error
    ns = load(sub)
    assert callable(ns["my_1f1b"]) and callable(ns["draw"]) and ns["P"] == 4  # defs and constants
    assert (
        "runs" not in ns and "first" not in ns and "verdict" not in ns
    )  # launches, widgets, checks: not run


def test_bad_command_lines_are_refused_one_line_each(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            str(tmp_path / "nope.ipynb"),
            str(tmp_path / "notes.txt"),
            str(empty),
            "--out",
            "/proc/grades.csv",
            "--jobs",
            "0",
            "--exercise",
            "bogus",
            "--deadline-scale",
            "-1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 8, err  # --out and the feedback folder beside it: two
    assert all(line.startswith("error: ") for line in err)
    for says in (
        "nope.ipynb: no such file",
        "notes.txt: not a notebook",
        "holds no .ipynb",
        "--out",
        "--jobs",
        "'bogus' is not an exercise",
        "--deadline-scale",
    ):
        assert any(says in line for line in err), (says, err)
    with pytest.raises(SystemExit) as e:  # argparse: SUBMISSION is required
        main(["--out", str(tmp_path / "g.csv")])
    assert e.value.code == 2


def test_a_grading_process_that_fails_by_itself_is_run_again(tmp_path, monkeypatch):
    # The grader's own failure (here: the first attempt for each student raises) is not the
    # student's: they are graded again, and only a second failure reaches their grade.
    real = grader.grade_student

    def fails_once(files, *a):
        marker = tmp_path / (os.path.basename(files[0]) + ".tried")
        if not marker.exists():
            marker.write_text("")
            raise OSError("simulated: the machine ran out of ports")
        return real(files, *a)

    monkeypatch.setattr(grader, "grade_student", fails_once)
    (tmp_path / "alice.py").write_text(MOE_RIGHT)
    out = grader.grade({"alice": [str(tmp_path / "alice.py")]}, ["moe_topk_capacity"], 7, 1, 1.0, log=print)
    assert out["alice"]["moe_topk_capacity"]["status"] == "passed", out
    assert (tmp_path / "alice.py.tried").exists()
