"""The modeled clock, generalized: re-time any recorded trace under a hardware model.

A run on CPU ranks records what happened and in what order (`trace.gather()`);
`retime(events, gpu="h100")` keeps that order and replaces every duration with what
the chosen hardware would take, using the one simulator (`minipar.sim.retime`):

    compute span:  FLOPs / (peak × MAMF fraction × kernel_efficiency)   (FLOPs from the span, or `flops=`)
    collective:    latency + wire bytes / (bandwidth × link efficiency)   (ring; trace.py)
    send → recv:   latency + bytes / (bandwidth × link efficiency)

The link of each event is its axis's: NVLink inside a node, the NIC for the axes named
in `inter_node_axes` (e.g. ("dp",) for data parallelism across nodes).
"""

from __future__ import annotations

import re

from ..sim import retime as sim_retime
from .estimate import ASSUMPTIONS, Assumptions
from .hardware import get_gpu, get_link

__all__ = ["retime", "event_cost"]

_KIND = re.compile(r"^\d*([FBIW])\d*$")


def event_cost(
    ev, gpu="h100", flops=None, inter_node_axes=(), assumptions: Assumptions | None = None
) -> float:
    """Modeled seconds of one trace event (see the module docstring)."""
    A, g = assumptions or ASSUMPTIONS, get_gpu(gpu)
    if ev.cat == "comm":
        link = get_link(g.inter_node if ev.axis in inter_node_axes else g.intra_node)
        return link.latency + ev.wire_bytes / (link.bandwidth * link.efficiency)
    work = ev.flops
    if callable(flops):
        work = flops(ev)
    elif flops:  # by name ("0F1", "attn") or by pipeline kind letter ("F" for "0F1")
        kind = _KIND.match(ev.name)
        work = flops.get(ev.name, flops.get(kind.group(1), work) if kind else work)
    return work / (g.peak_flops * g.matmul_efficiency * A.kernel_efficiency)


def retime(
    events: list,
    gpu="h100",
    flops=None,
    inter_node_axes=(),
    pp_axis: str = "pp",
    assumptions: Assumptions | None = None,
) -> list:
    """Events of all ranks on the modeled clock of `gpu` (returns new trace.Events).

    `flops`: FLOPs of compute spans that did not record them: {name or kind letter: FLOPs}
    or a callable(event). Spans with neither cost nothing (say so when you plot them)."""
    if not events:
        raise ValueError("retime needs events: record a run with minipar.trace and pass trace.gather()")
    g, A = get_gpu(gpu), assumptions or ASSUMPTIONS
    p2p_link = get_link(g.inter_node if pp_axis in inter_node_axes else g.intra_node)

    def p2p(nbytes):
        return p2p_link.latency + nbytes / (p2p_link.bandwidth * p2p_link.efficiency)

    return sim_retime(events, lambda ev: event_cost(ev, g, flops, inter_node_axes, A), p2p)
