"""The course kit: every exercise grades itself, and the student copies say "NOT YET".

(a) Every checker in `minipar.exercises.CHECKERS` must pass its reference solution and
    reject at least two plausible wrong answers. Most topics test that beside their
    strategy (`PER_TOPIC` points to each test); this file checks that the map covers
    every registered checker and tests the one of notebook 10 itself.
(b) `scripts/make_student_copies.py` empties the solution cells, and running a copy's
    exercise cells (its first code cell, the imports, plus every code cell of its
    "Exercise" section) prints a clear NOT YET verdict instead of raising.
"""
from __future__ import annotations

import ast
import glob
import math
import os
import sys

import nbformat
import pytest
import torch

from minipar.exercises import CHECKERS, check
from minipar.exercises.memory import fp8_fake_quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# checker -> the test that passes its reference and rejects >= 2 wrong answers (named in the comment)
PER_TOPIC = {
    "ring_all_gather": "test_foundation.py::test_ring_all_gather_checker_passes_the_solution_and_rejects_wrong_answers",
    # ^ the collective itself; forwarding its own block every step (off by one)
    "dp_allreduce": "test_dp.py::test_dp_allreduce_checker_passes_the_solution_and_rejects_wrong_ones",
    # ^ summed instead of averaged; local gradients only
    "zero_shard": "test_zero.py::test_zero_shard_checker_passes_the_solution_and_rejects_wrong_ones",
    # ^ a reduce-scatter that forgot to pad; one that forgot to divide
    "tp_mlp": "test_tp.py::test_exercise_checkers",          # forgot f; bias added before g (t times)
    "sp_mlp": "test_tp.py::test_exercise_checkers",          # all-reduce instead of reduce-scatter; plain TP
    "cp_merge": "test_cp.py::test_merge_exercise_checker",   # averaged; exp overflow; max as lse
    "moe_topk_capacity": "test_moe.py::test_exercise_checker",  # no capacity; token-major queue; unnormalized
    "memory_per_gpu": "test_plan.py::test_exercise_checker_accepts_the_reference_and_rejects_wrong_answers",
    # ^ Ψ not split by TP; one micro-batch in flight; without SP
    "pp_1f1b": "test_pp_exercise.py::test_checker_rejects_wrong_answers",  # GPipe; naive; warm-up off by one
    "nd_layout": "test_exercises.py::test_nd_layout_checker",  # tp across nodes; wrong product; no fit; ZeRO-3
    "fp8_fake_quant": "test_exercises.py::test_fp8_fake_quant_checker",  # no clamp; current amax; no unscale
    "serve_admission": "test_serve.py::test_exercise_checker",  # ignores the cache; prompt only; off by one; early
}

# Notebooks whose exercise is not tagged yet (none: every notebook's solution cell is tagged).
# The test below fails once a listed notebook is tagged, so that this list stays empty.
NOT_YET_TAGGED: set = set()


def test_every_checker_has_a_test_of_its_reference_and_two_wrong_answers():
    check("fp8_fake_quant", fp8_fake_quant)  # imports every topic module, registering all checkers
    assert set(CHECKERS) == set(PER_TOPIC), "add the new checker and its test to PER_TOPIC"
    for name, node in PER_TOPIC.items():
        path, fn = node.split("::")
        tree = ast.parse(open(os.path.join(ROOT, "tests", path)).read())
        funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert fn in funcs, f"{node} does not exist"
        src = ast.unparse(funcs[fn])
        assert f"check('{name}'" in src, f"{node} does not call check({name!r}, ...)"


# ----------------------------------------------------------------------------- notebook 08's checker
def test_nd_layout_checker():
    from minipar.exercises.nd import reference_layout
    assert check("nd_layout", reference_layout)
    wrongs = {"spans more than one node": dict(tp=16, pp=1, dp=1, zero_stage=1),
              "there are 16 GPUs": dict(tp=2, pp=1, dp=4, zero_stage=1),
              "does not fit": dict(tp=1, pp=1, dp=16, zero_stage=0),      # plain DDP of 13B: 16Ψ = 208 GB
              "predicts MFU": dict(tp=1, pp=1, dp=16, zero_stage=3)}       # fits, but pays ZeRO-3's gathers
    for says, layout in wrongs.items():
        v = check("nd_layout", lambda layout=layout: layout)
        assert not v and says in v.message and v.hint, (layout, str(v))
    assert not check("nd_layout", lambda: (2, 1, 8))
    assert "not yet" in check("nd_layout", None).message


# ----------------------------------------------------------------------------- notebook 10's checker
def _fmt_max(fmt):
    return torch.finfo({"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]).max


def _scale(hist, fmt):
    return 2.0 ** math.floor(math.log2(_fmt_max(fmt) / max(hist))) if max(hist) > 0 else 1.0


def test_fp8_fake_quant_checker():
    assert check("fp8_fake_quant", fp8_fake_quant)

    def no_clamp(x, hist, fmt):  # overflow becomes inf in e5m2
        dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
        s = _scale(hist, fmt)
        return (x * s).to(dt).to(x.dtype) / s

    def current_amax(x, hist, fmt):  # current scaling, not delayed: no saturation
        return fp8_fake_quant(x, [x.abs().max().item()], fmt)

    def never_unscales(x, hist, fmt):
        return fp8_fake_quant(x, hist, fmt) * _scale(hist, fmt)

    def unscaled(x, hist, fmt):  # s = 1: tiny gradients flush to zero
        return fp8_fake_quant(x, [_fmt_max(fmt)], fmt)

    def exact_scale(x, hist, fmt):  # s not rounded to a power of two
        dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
        m = _fmt_max(fmt)
        s = m / max(hist) if max(hist) > 0 else 1.0
        return (x * s).clamp(-m, m).to(dt).to(x.dtype) / s

    wrongs = {no_clamp: "inf or nan", current_amax: "off by", never_unscales: "power of two",
              unscaled: "off by", exact_scale: "off by"}
    for wrong, says in wrongs.items():
        v = check("fp8_fake_quant", wrong)
        assert not v and says in str(v) and v.hint, (wrong.__name__, str(v))
    v = check("fp8_fake_quant", lambda x, h, f: 1 / 0)
    assert not v and "ZeroDivisionError" in v.message
    assert "not yet" in check("fp8_fake_quant", None).message


# ----------------------------------------------------------------------------- student copies
def _notebooks():
    return sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))


def _exercise_cells(nb):
    """The first code cell (imports, config) and every code cell after the last "Exercise" heading."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "Exercise" in c.source
             and c.source.lstrip().startswith("#")]
    assert heads, "no '## Exercise' heading"
    after = [c for c in nb.cells[heads[-1]:] if c.cell_type == "code"]
    return [code[0]] + [c for c in after if c is not code[0]]


@pytest.fixture(scope="module")
def student_copies(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import make_student_copies
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("student")
    written = make_student_copies.main(["--out", str(out)])
    return {os.path.basename(p)[:-6]: nbformat.read(p, as_version=4) for p in written}


def test_every_notebook_has_a_tagged_exercise_and_its_copy_is_emptied(student_copies):
    assert set(student_copies) == {os.path.basename(p)[:-6] for p in _notebooks()}
    for name, copy in student_copies.items():
        original = nbformat.read(os.path.join(ROOT, "notebooks", name + ".ipynb"), as_version=4)
        tagged = [c for c in copy.cells if "solution" in c.metadata.get("tags", [])]
        if name in NOT_YET_TAGGED:
            assert not tagged, f"{name} is tagged now: remove it from NOT_YET_TAGGED"
            continue
        assert tagged, f"{name}: no cell tagged 'solution'"
        for c in tagged:
            body = ast.parse(c.source)
            funcs = [n for n in body.body if isinstance(n, ast.FunctionDef)]
            assert funcs and all("raise NotYet(" in ast.get_source_segment(c.source, f) for f in funcs), name
            assert not [n for n in body.body if not isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
        assert not any("# solution-only" in c.source for c in copy.cells)
        assert not any(c.get("outputs") for c in copy.cells if c.cell_type == "code")
        assert len(copy.cells) == len(original.cells)


def test_running_a_student_copys_exercise_says_not_yet(student_copies):
    from nbclient import NotebookClient
    for name, copy in sorted(student_copies.items()):
        if name in NOT_YET_TAGGED:
            continue
        nb = nbformat.v4.new_notebook(cells=_exercise_cells(copy), metadata=copy.metadata)
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()  # raises on error
        out = "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.get("output_type") == "stream")
        assert "NOT YET" in out, f"{name}: the checker did not say NOT YET:\n{out[-2000:]}"
