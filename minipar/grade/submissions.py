"""Reading a submission: which of its statements the grader runs, and which exercises it answers.

From every code cell only imports, function and class definitions and constants are kept, and
only definitions whose creation runs none of the student's code (no decorators, constant default
arguments): grading never runs a notebook's training loops or plots, and nothing of the student's
runs in the grading process before the checkers isolate it.
"""

from __future__ import annotations

import ast
import linecache
from dataclasses import dataclass, field

import nbformat

from ..exercises import EXERCISES

__all__ = ["Submission", "extract", "load", "SUFFIXES"]

SUFFIXES = (".ipynb", ".py")


@dataclass
class Submission:
    """What the grader runs of one file: its definitions, cell by cell, and the exercises it answers."""

    path: str
    cells: list = field(default_factory=list)  # (filename, source) of each code cell (a .py file: one)
    answers: dict = field(default_factory=dict)  # exercise name -> function name
    notes: list = field(default_factory=list)  # what was skipped, and why
    imports: set = field(default_factory=set)  # the modules its imports name
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
            (
                isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and all(
                    isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod")
                    for d in n.decorator_list
                )
                and all(_is_constant(d) for d in n.args.defaults)
            )
            or (isinstance(n, ast.Assign) and _is_constant(n.value))
            or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            for n in node.body
        )
        return plain and not node.decorator_list and body_ok
    return False


def _keep(node) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return _safe_def(node)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        value = node.value
        if isinstance(value, ast.Lambda):  # `f = lambda p, m: ...` defines a function too
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
        if (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in EXERCISES
            and isinstance(node.args[1], ast.Name)
        ):
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
            cells = [
                (f"{path}, cell {i + 1}", _python(c.source))
                for i, c in enumerate(nb.cells)
                if c.cell_type == "code"
            ]
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
                sub.notes.append(
                    f"{filename}: skipped `{n.name}`: the grader runs no decorators and no "
                    "computed default arguments"
                )
        sub.cells.append((filename, source))
    return sub


def load(sub: Submission) -> dict:
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
