"""Build notebooks from their sources and execute them in place.

    python scripts/build_notebook.py notebooks/src/00_collectives.py [...]
    python scripts/build_notebook.py --all

Each source is a jupytext "percent" script (`# %%` code cells, `# %% [markdown]`
text cells) in notebooks/src/; the executed .ipynb lands in notebooks/ with its
outputs, so GitHub shows the figures. Edit the source, never the .ipynb.
"""
import argparse
import glob
import os
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient


def build(src: str, timeout: int = 600) -> str:
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(src))), os.path.basename(src)[:-3] + ".ipynb")
    t = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(out)}}).execute()
    nbformat.write(nb, out)
    print(f"{out}: executed in {time.time() - t:.1f}s")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*")
    ap.add_argument("--all", action="store_true", help="every notebooks/src/*.py")
    a = ap.parse_args()
    srcs = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "src", "*.py"))) if a.all else a.sources
    if not srcs:
        sys.exit("give notebook sources, or --all")
    for s in srcs:
        build(s)
