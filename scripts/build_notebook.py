"""Build notebooks from their sources and execute them.

    python3 scripts/build_notebook.py notebooks/src/00_collectives.py [...]   # -> notebooks/NN_name.ipynb
    python3 scripts/build_notebook.py --all
    python3 scripts/build_notebook.py --instructor --all                      # -> instructor/notebooks/

Each source is a jupytext "percent" script (`# %%` code cells, `# %% [markdown]` text cells)
in notebooks/src/. The executed .ipynb lands in notebooks/ with its outputs, so GitHub shows
the figures; its exercise cell raises NotYet, as in a student's copy, and its checker says
NOT YET (`make_student_copies.py` explains the cell tags). `--instructor` builds the same
notebook with the worked solution of instructor/solutions/NN_name.py in the exercise cell, its
checker's `assert verdict` kept, into instructor/notebooks/ (not committed). Edit the source,
never the .ipynb.

The written notebook opens cleanly in JupyterLab: its kernelspec is the one ipykernel installs
(Lab rewrites any other, marking the notebook modified), cell ids are stable from build to
build, the widgets' state is saved, and a widget's text form (what a front end shows before a
kernel runs, or for an untrusted notebook) says to run its cell rather than `VBox(children=...`.
"""

import argparse
import glob
import os
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_student_copies import instructor, public  # noqa: E402 - a sibling script

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET = "application/vnd.jupyter.widget-view+json"
PLACEHOLDER = "▶ Interactive controls: run this cell (Shift+Enter) to use them."


def stabilize(nb):
    """Cell ids from their position (so a rebuild does not rewrite every id) and the kernelspec
    JupyterLab writes, so that opening the notebook changes nothing."""
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.pop("jupytext", None)
    nb.nbformat, nb.nbformat_minor = 4, 5
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    return nb


def widget_placeholders(nb):
    """Replace the `VBox(children=(...` text form of every widget output with a sentence."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET in data and not str(data.get("text/plain", "")).startswith("▶"):
                data["text/plain"] = PLACEHOLDER
    return nb


def build(src: str, timeout: int = 600, instructor_copy: bool = False) -> str:
    name = os.path.basename(src)[:-3]
    nb = jupytext.read(src)
    nb = instructor(nb, name) if instructor_copy else public(nb)
    nb = stabilize(nb)
    out_dir = (
        os.path.join(HERE, "instructor", "notebooks") if instructor_copy else os.path.join(HERE, "notebooks")
    )
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name + ".ipynb")
    t = time.time()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": os.path.join(HERE, "notebooks")}},
    ).execute()
    nb = widget_placeholders(stabilize(nb))
    nbformat.write(nb, out)
    print(f"{out}: executed in {time.time() - t:.1f}s")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*")
    ap.add_argument("--all", action="store_true", help="every notebooks/src/*.py")
    ap.add_argument(
        "--instructor",
        action="store_true",
        help="with the worked solutions, into instructor/notebooks/ (for the instructor only)",
    )
    a = ap.parse_args()
    srcs = sorted(glob.glob(os.path.join(HERE, "notebooks", "src", "*.py"))) if a.all else a.sources
    if not srcs:
        sys.exit("give notebook sources, or --all")
    for s in srcs:
        build(s, instructor_copy=a.instructor)
