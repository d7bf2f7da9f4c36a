"""Write student copies of the notebooks, with the exercise solutions emptied.

    python scripts/make_student_copies.py            # -> notebooks/student/*.ipynb

A solution cell is a code cell tagged "solution" (in a notebook source:
`# %% tags=["solution"]`). In the copy, each function it defines keeps its signature
and docstring and raises `NotYet`, so running the notebook's checker prints a clear
"NOT YET" verdict instead of an error; its other statements are removed. Lines ending
in `# solution-only` (such as `assert verdict`) are dropped from every cell. Outputs
are cleared, so the student sees only what they run.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os

import nbformat

STUB = '    raise NotYet("write this function, then run the checker cell")'


def stub_solution(source: str) -> str:
    tree = ast.parse(source)
    lines = source.splitlines()
    out = ["from minipar.exercises import NotYet", ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            head_end = node.body[0].lineno - 1  # the lines of the def itself (may span several)
            out += lines[node.lineno - 1 - len(node.decorator_list):head_end]
            doc = ast.get_docstring(node)
            if doc:
                out.append(f'    """{doc}"""')
            out += [STUB, ""]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(ast.get_source_segment(source, node))
    return "\n".join(out).rstrip() + "\n"


def student_copy(nb):
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "solution" in cell.get("metadata", {}).get("tags", []):
            cell.source = stub_solution(cell.source)
        cell.source = "\n".join(l for l in cell.source.splitlines() if not l.rstrip().endswith("# solution-only"))
        cell.outputs, cell.execution_count = [], None
    return nb


def main(argv=None) -> list[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb")
    ap.add_argument("--out", default=os.path.join(here, "notebooks", "student"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    written = []
    for path in a.notebooks or sorted(glob.glob(os.path.join(here, "notebooks", "[0-9][0-9]_*.ipynb"))):
        nb = student_copy(nbformat.read(path, as_version=4))
        dst = os.path.join(a.out, os.path.basename(path))
        nbformat.write(nb, dst)
        written.append(dst)
        print(dst)
    return written


if __name__ == "__main__":
    main()
