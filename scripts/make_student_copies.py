"""Write the student copies of the notebooks: no worked solution, no cell that shows the answer.

    python3 scripts/make_student_copies.py            # -> notebooks/student/NN_name.ipynb
    python3 scripts/make_student_copies.py --out DIR notebooks/05_pipeline_parallel.ipynb

Conventions of a notebook source (notebooks/src/NN_name.py; see docs/course/instructor.md):

* `# %% tags=["exercise"]`: the student's cell, a function whose body raises `NotYet`. The
  worked solution is instructor/solutions/NN_name.py, outside the notebook and the package;
  `scripts/build_notebook.py --instructor` puts it in its place.
* `# %% tags=["reveals"]`: a cell that prints or calls the code the exercise asks for (the
  package's own 1F1B generator, its merge, its slot assignment). The copy replaces it with a
  short note, keeping its figures as pictures, never its code or printed text.
* `# %% tags=["solution"]`: a worked solution still inside the source (notebooks not migrated
  yet). The copy (and the committed notebook) keep its signatures and docstrings and raise NotYet.
* a line ending in `# solution-only` (the `assert verdict` after a checker) is dropped.

The copy's outputs are cleared. Before writing, every copy is checked: no code cell names a
function listed in its exercise's `reveals`, no line of the worked solution appears in it, and
no cell uses a name that only a dropped cell defined. A copy that fails is not written.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import sys

import nbformat

from minipar.exercises import load_all

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(HERE, "instructor", "solutions")
STUB = '    raise NotYet("write this function, then run the checker cell")'
NOTE = (
    "*This cell of the full notebook shows code that the exercise below asks you to write, so it is left "
    "out of your copy.*"
)


class LeakError(RuntimeError):
    """A student copy would show (part of) an answer."""


def tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def strip_solution_only(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not line.rstrip().endswith("# solution-only"))


def stub_solution(source: str) -> str:
    """Keep each function's signature and docstring, raise NotYet; keep imports; drop the rest."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out = ["from minipar.exercises import NotYet", ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            head_end = node.body[0].lineno - 1  # the lines of the def itself (may span several)
            out += lines[node.lineno - 1 - len(node.decorator_list) : head_end]
            doc = ast.get_docstring(node)
            if doc:
                out.append(f'    """{doc}"""')
            out += [STUB, ""]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(ast.get_source_segment(source, node))
    return "\n".join(out).rstrip() + "\n"


def public(nb):
    """The committed notebook's cells: inline solutions stubbed, solution-only lines dropped."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "solution" in tags(cell):
            cell.source = stub_solution(cell.source)
            cell.metadata["tags"] = [t for t in tags(cell) if t != "solution"] + ["exercise"]
        cell.source = strip_solution_only(cell.source)
    return nb


def solution_file(name: str) -> str:
    return os.path.join(SOLUTIONS, name + ".py")


def instructor(nb, name: str):
    """The instructor's notebook: each exercise (or inline solution) cell holds the worked solution."""
    path = solution_file(name)
    for cell in nb.cells:
        if cell.cell_type == "code" and {"exercise", "solution"} & set(tags(cell)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{name}: no worked solution at {path}")
            cell.source = open(path).read().rstrip() + "\n"
    return nb


def _defined(source: str) -> set:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _used(source: str) -> set:
    try:
        return {
            n.id
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
    except SyntaxError:
        return set()


def _note(cell):
    """The markdown that replaces a dropped cell: the note, and its figures as pictures."""
    md = nbformat.v4.new_markdown_cell(NOTE)
    images = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    if images:
        md.attachments = {f"figure{i}.png": {"image/png": data} for i, data in enumerate(images)}
        md.source += "\n\n" + "\n".join(
            f"![figure {i + 1}](attachment:figure{i}.png)" for i in range(len(images))
        )
    return md


def _pattern(name: str):
    pre = r"\b" if re.match(r"\w", name) else ""
    post = r"\b" if re.search(r"\w$", name) else ""
    return re.compile(pre + re.escape(name) + post)


def solution_lines(name: str) -> list[str]:
    """The lines of a worked solution that would give it away: code, not imports, defs or docstrings."""
    path = solution_file(name)
    if not os.path.exists(path):
        return []
    src = open(path).read()
    skip = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
            skip.add(node.lineno)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip |= set(range(node.lineno, node.end_lineno + 1))
    lines = [line.split("#")[0].strip() for i, line in enumerate(src.splitlines(), 1) if i not in skip]
    return [line for line in lines if len(line) >= 24]  # shorter ones are idioms, not an answer


def leaks(nb, name: str) -> list[str]:
    """Why a student copy `nb` of notebook `name` would show an answer (empty if it would not)."""
    problems = []
    reveals = [r for ex in load_all().values() if ex.notebook == name for r in ex.reveals]
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, c in code:
        for r in reveals:
            if _pattern(r).search(c.source):
                problems.append(
                    f'cell {i} names {r!r}, which shows the exercise\'s answer: tag that cell "reveals"'
                )
        for line in solution_lines(name):
            if line in c.source:
                problems.append(f"cell {i} contains the worked solution's line {line!r}")
        if c.get("outputs"):
            problems.append(f"cell {i} still has outputs")
    return problems


def student_copy(nb, name: str = ""):
    """The copy a student gets (see the module docstring); raises LeakError if it would leak."""
    nb = public(nb)
    dropped, kept = set(), []
    for cell in nb.cells:
        if "reveals" in tags(cell):
            dropped |= _defined(cell.source)
            kept.append(_note(cell))
            continue
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        kept.append(cell)
    nb.cells = kept
    nb.metadata.pop("widgets", None)  # the saved state of widgets whose outputs are cleared
    defined_elsewhere = set().union(*(_defined(c.source) for c in kept if c.cell_type == "code"))
    problems = leaks(nb, name) if name else []
    for i, c in enumerate(kept):
        if c.cell_type == "code":
            missing = (_used(c.source) & dropped) - defined_elsewhere
            if missing:
                problems.append(f"cell {i} uses {', '.join(sorted(missing))}, defined only in a dropped cell")
    if problems:
        raise LeakError(f"{name}: " + "; ".join(problems))
    return nb


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb")
    ap.add_argument("--out", default=os.path.join(HERE, "notebooks", "student"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    written = []
    for path in a.notebooks or sorted(glob.glob(os.path.join(HERE, "notebooks", "[0-9][0-9]_*.ipynb"))):
        name = os.path.basename(path)[: -len(".ipynb")]
        try:
            nb = student_copy(nbformat.read(path, as_version=4), name)
        except LeakError as e:
            sys.exit(f"not written: {e}")
        dst = os.path.join(a.out, os.path.basename(path))
        nbformat.write(nb, dst)
        written.append(dst)
        print(dst)
    return written


if __name__ == "__main__":
    main()
