"""Regenerate every figure under figures/ (the README shows them).

    python scripts/make_figures.py            # all
    python scripts/make_figures.py ring       # by name

Each figure is a small function below that runs minipar on simulated CPU ranks (or the
simulator) and saves one PNG; all use the package's one timeline renderer and colours.
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import minipar  # noqa: E402
from minipar import runtime, trace  # noqa: E402
from minipar.timeline import plot_timeline  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(HERE, "figures")
FIGURES = {}


def figure(name):
    def reg(fn):
        FIGURES[name] = fn
        return fn
    return reg


def _save(fig, name):
    path = os.path.join(OUT, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


def _ring(numel):
    from minipar.collectives import ring_all_reduce
    ring_all_reduce(torch.randn(numel))
    return trace.gather()


@figure("ring_allreduce")
def ring_allreduce():
    evs = minipar.launch(_ring, 4, 1 << 16)[0]
    ax = plot_timeline(evs, title="ring all-reduce of 256 KiB on 4 CPU ranks (wall clock): 2(N-1) exchanges")
    _save(ax.figure, "ring_allreduce")


@figure("main_job")
def main_job():
    from minipar.train import main
    out = os.path.join(HERE, "runs", "figures")
    main(["--steps", "5", "--out", out, "--no-check"])
    import shutil
    shutil.copy(os.path.join(out, "timeline.png"), os.path.join(OUT, "main_job_timeline.png"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    names = sys.argv[1:] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    for n in names:
        FIGURES[n]()
