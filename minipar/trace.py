"""Per-rank event recording, merging across ranks, and Chrome-trace export.

Every communication call (see `comm`) and every compute span lands here as an
`Event`. Byte conventions, used everywhere in minipar:

* `bytes`: the logical payload of the call on this rank. all_reduce: the tensor
  reduced; all_gather: the gathered output; reduce_scatter: the input before
  scattering; all_to_all: what this rank sends (its own block included);
  send/recv/broadcast: the tensor.
* `wire_bytes`: what this rank puts on the wire under the ring algorithm, e.g.
  2(N-1)/N of the tensor for all_reduce, (N-1)/N for all_gather/reduce_scatter,
  the tensor for a send and 0 for a recv.

Times are host seconds (`time.perf_counter`, one clock for every rank of a host). On the CPU a
span or a collective is stamped when it happens. On a GPU the host only queues work, so spans and
collectives are stamped with CUDA events on the stream that runs them (`now()`), kept pending, and
turned into host seconds after the step by `resolve()` (`events()` and `gather()` call it): one
wait for the device per step, none per call (see `minipar.streams`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

from . import runtime, streams

__all__ = [
    "Event",
    "span",
    "now",
    "record",
    "record_span",
    "record_timed",
    "resolve",
    "events",
    "reset",
    "enabled",
    "gather",
    "merge",
    "summary",
    "format_summary",
    "to_chrome_trace",
]


@dataclass
class Event:
    rank: int
    name: str  # op ("all_reduce", "send", ...) or compute label ("F", "0F1", "attn")
    cat: str  # "comm" or "compute"
    start: float  # seconds, on the host's monotonic clock
    end: float
    axis: str = ""  # mesh axis or group name for comm ("dp", "tp", "world", ...)
    bytes: int = 0
    wire_bytes: float = 0.0
    flops: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


_events: list[Event] = []
_pending: list = []  # (Event, start event, end event, streams): device times not yet read
_enabled = [True]


def reset() -> None:
    _events.clear()
    _pending.clear()
    _enabled[0] = True


def events() -> list[Event]:
    resolve()
    return list(_events)


@contextmanager
def enabled(on: bool = True):
    """Temporarily switch recording on or off (e.g. for warm-up steps)."""
    old, _enabled[0] = _enabled[0], on
    try:
        yield
    finally:
        _enabled[0] = old


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def record(ev: Event) -> None:
    if _enabled[0]:
        _events.append(ev)


def now():
    """A timestamp of this point of the rank's compute: host seconds on the CPU; on a GPU a CUDA
    event recorded on the current stream (it fires when the GPU gets there), read by `resolve`."""
    dev = streams.active()
    if dev is None:
        return time.perf_counter()
    mark = dev.event()
    mark.record(dev.current())
    return mark


def record_timed(ev: Event, start, end, dev=None) -> None:
    """Record `ev` between two timestamps of `now()` (or events recorded on any stream of `dev`)."""
    if not _enabled[0]:
        return
    if isinstance(start, float):
        ev.start, ev.end = start, end
        _events.append(ev)
    else:
        _pending.append((ev, start, end, dev or streams.active()))


def record_span(name: str, start, end=None, flops: float = 0.0, **meta) -> None:
    """A compute span from `start` (a `now()`) to `end` (default: now)."""
    record_timed(
        Event(_rank(), name, "compute", 0.0, 0.0, flops=flops, meta=meta),
        start,
        now() if end is None else end,
    )


@contextmanager
def span(name: str, flops: float = 0.0, **meta):
    """Record a compute span: `with span("0F1", flops=...): ...`."""
    start = now()
    try:
        yield
    finally:
        record_span(name, start, flops=flops, **meta)


def resolve() -> None:
    """Turn pending device timestamps into host seconds. Waits for the device to reach the last
    of them (call it after a step, not inside one), then reads one anchor event recorded after
    them all: t(e) = t_host(anchor) - elapsed(e -> anchor)."""
    if not _pending:
        return
    dev = _pending[-1][3]
    for _, _, end, _ in _pending:
        end.synchronize()
    anchor = dev.event()
    anchor.record(dev.current())
    anchor.synchronize()
    t = time.perf_counter()
    for ev, start, end, _ in _pending:
        ev.start = t - start.elapsed_time(anchor) / 1e3  # elapsed_time is in milliseconds
        ev.end = t - end.elapsed_time(anchor) / 1e3
        _events.append(ev)
    _pending.clear()


def merge(per_rank: list[list[Event]]) -> list[Event]:
    """Flatten per-rank event lists and shift times so the earliest event is at 0."""
    flat = [e for evs in per_rank for e in evs]
    if not flat:
        return []
    t0 = min(e.start for e in flat)
    return sorted(
        (Event(**{**asdict(e), "start": e.start - t0, "end": e.end - t0}) for e in flat),
        key=lambda e: (e.rank, e.start),
    )


def gather(group=None) -> list[Event]:
    """Collective: every rank gets the merged events of all ranks (untraced itself)."""
    if not dist.is_initialized():
        return merge([events()])
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, events(), group=group)
    return merge(out)


def summary(evs: list[Event]) -> dict:
    """{rank: {(op, axis): {"count", "bytes", "wire_bytes", "seconds"}}} over comm events."""
    out: dict = defaultdict(
        lambda: defaultdict(lambda: {"count": 0, "bytes": 0, "wire_bytes": 0, "seconds": 0.0})
    )
    for e in evs:
        if e.cat != "comm":
            continue
        s = out[e.rank][(e.name, e.axis)]
        s["count"] += 1
        s["bytes"] += e.bytes
        s["wire_bytes"] += e.wire_bytes
        s["seconds"] += e.duration
    return {r: dict(v) for r, v in sorted(out.items())}


def format_summary(evs: list[Event]) -> str:
    rows = [f"{'rank':>4}  {'op':<16}{'axis':<8}{'count':>6}{'payload B':>14}{'wire B':>14}"]
    for r, ops in summary(evs).items():
        for (op, axis), s in sorted(ops.items()):
            rows.append(f"{r:>4}  {op:<16}{axis:<8}{s['count']:>6}{s['bytes']:>14,}{s['wire_bytes']:>14,}")
    return "\n".join(rows)


def to_chrome_trace(evs: list[Event], path: str | None = None) -> dict:
    """Chrome trace JSON (Perfetto, chrome://tracing): one process track per rank,
    thread 0 for compute and thread 1 for communication."""
    out = []
    for r in sorted({e.rank for e in evs}):
        out.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "compute"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "comm"}})
    for e in evs:
        args = {"axis": e.axis, "bytes": e.bytes, "wire_bytes": e.wire_bytes, "flops": e.flops, **e.meta}
        out.append(
            {
                "ph": "X",
                "name": e.name,
                "cat": e.cat,
                "pid": e.rank,
                "tid": 0 if e.cat == "compute" else 1,
                "ts": e.start * 1e6,
                "dur": max(e.duration, 0.0) * 1e6,
                "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))},
            }
        )
    trace = {"traceEvents": out, "displayTimeUnit": "ms"}
    if path:
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace


runtime.at_rank_start(reset)  # every launched rank starts with an empty trace
