"""The one timeline renderer: a per-rank Gantt chart of traced events.

Each rank gets a row of lanes, and **every lane shows one kind of event**: compute on top, then
one lane per kind of communication the events contain (all-reduce, all-gather, reduce-scatter,
all-to-all, broadcast, send, recv), in that order. Communication overlaps compute and other
communication (ZeRO-3's all-gather of the next unit runs while the reduce-scatter of the last
one is in flight), so two kinds sharing a lane would hide each other. Colours are fixed per op
kind across every notebook and figure (see `COLORS`). Pipeline actions ("0F1", "1B0", "0W2",
"F", "B", ...) are coloured by their kind letter.
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

__all__ = ["COLORS", "AXIS_COLORS", "COMM_LANES", "color_of", "lanes_of", "plot_timeline"]

COLORS = {
    # compute
    "F": "#4C72B0",
    "B": "#55A868",
    "I": "#8FD19E",
    "W": "#8172B2",
    "compute": "#4C72B0",
    "opt": "#B4B4B4",
    "recompute": "#E3C16F",
    # communication
    "all_reduce": "#C44E52",
    "all_gather": "#DD8452",
    "reduce_scatter": "#937860",
    "all_to_all": "#DA8BC3",
    "broadcast": "#CCB974",
    "send": "#8C8C8C",
    "recv": "#BDBDBD",
}
# communication coloured by mesh axis instead of by op (plot_timeline(color_by="axis"))
AXIS_COLORS = {
    "tp": "#C44E52",
    "cp": "#DA8BC3",
    "ep": "#8172B2",
    "dp": "#DD8452",
    "pp": "#8C8C8C",
    "world": "#CCB974",
}
COMM_LANES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv")
_ACTION = re.compile(r"^\d*([FBIW])\d*$")
_BAND = 0.84  # the height of one rank's row that its lanes share (the rest is the gap)


def color_of(ev) -> str:
    name = ev.name if hasattr(ev, "name") else str(ev)
    if name in COLORS:
        return COLORS[name]
    m = _ACTION.match(name.split(":")[0])
    if m:
        return COLORS[m.group(1)]
    kind = getattr(ev, "meta", {}).get("kind") if hasattr(ev, "meta") else None
    return COLORS.get(kind, COLORS["compute"] if getattr(ev, "cat", "compute") == "compute" else "#8C8C8C")


def _legend_key(ev) -> str:
    if ev.name in COLORS:
        return ev.name
    m = _ACTION.match(ev.name.split(":")[0])
    if m:
        return m.group(1)
    kind = getattr(ev, "meta", {}).get("kind")
    return kind if kind in COLORS else ("compute" if ev.cat == "compute" else ev.name)


def _lane_of(ev) -> str:
    return ev.name if ev.cat == "comm" else "compute"


def lanes_of(events) -> list[str]:
    """The lanes a set of events needs, top to bottom: compute, then each kind of communication."""
    comm = {_lane_of(e) for e in events if e.cat == "comm"}
    return ["compute"] + [k for k in COMM_LANES if k in comm] + sorted(comm - set(COMM_LANES))


def _geometry(lanes: list[str]) -> dict[str, tuple[float, float]]:
    """(offset from the row's top, height) of each lane: compute gets half the band (all of it
    without communication), the communication lanes share the other half."""
    comm = lanes[1:]
    if not comm:
        return {"compute": (0.0, _BAND)}
    top, rest = _BAND * 0.5, _BAND * 0.5 / len(comm)
    return {"compute": (0.0, top), **{k: (top + i * rest, rest) for i, k in enumerate(comm)}}


def plot_timeline(
    events,
    ax=None,
    title: str | None = None,
    unit: str = "ms",
    label: bool = True,
    ranks=None,
    legend: bool = True,
    clock: str = "wall",
    color_by: str = "op",
):
    """Draw `events` (trace.Event-like: rank, name, cat, start, end in seconds).

    `clock` only labels the x axis: "wall" for measured time, "modeled" for a
    simulator's re-timing. `color_by="axis"` colours communication by its mesh axis
    (tp, cp, ep, dp, pp) rather than by op; the lanes stay one per op. Returns the
    matplotlib Axes."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6, "units": 1.0}[unit]
    ranks = sorted({e.rank for e in events}) if ranks is None else list(ranks)
    lanes = lanes_of([e for e in events if e.rank in set(ranks)])
    geo = _geometry(lanes)
    if ax is None:
        _, ax = plt.subplots(figsize=(11, (0.55 + 0.12 * (len(lanes) - 1)) * len(ranks) + 1.2))
    row = {r: i for i, r in enumerate(ranks)}
    end = max((e.end for e in events), default=1.0) * scale
    used = {}
    for e in events:
        if e.rank not in row:
            continue
        comm = e.cat == "comm"
        off, h = geo[_lane_of(e)]
        y0 = row[e.rank] - _BAND / 2 + off
        w = max((e.end - e.start) * scale, end * 1e-4)
        c = AXIS_COLORS.get(e.axis, "#8C8C8C") if comm and color_by == "axis" else color_of(e)
        ax.broken_barh([(e.start * scale, w)], (y0, h), facecolors=c, edgecolor="white", linewidth=0.4)
        used[f"{e.axis} comm" if comm and color_by == "axis" else _legend_key(e)] = c
        if label and not comm and w > end / 60:
            ax.text(
                e.start * scale + w / 2,
                y0 + h / 2,
                e.name,
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    center = lambda r, k: row[r] - _BAND / 2 + geo[k][0] + geo[k][1] / 2  # noqa: E731
    ax.set_yticks([center(r, "compute") for r in ranks], [f"rank {r}" for r in ranks])
    if len(lanes) > 1 and len(ranks) <= 8:  # name the communication lanes, small, under each rank's name
        minor = [(center(r, k), k.replace("_", "-")) for r in ranks for k in lanes[1:]]
        ax.set_yticks([y for y, _ in minor], [n for _, n in minor], minor=True)
        ax.tick_params(axis="y", which="minor", labelsize=6, length=0, labelcolor="#555555")
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel(f"{'modeled' if clock == 'modeled' else 'wall-clock'} time ({unit})")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    if legend and used:
        handles = [
            Patch(color=c, label=k) for k, c in sorted(used.items()) if k != "compute" or len(used) > 1
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return ax
