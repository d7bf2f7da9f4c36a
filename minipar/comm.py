"""The one place where minipar communicates: traced collectives and p2p. The autograd-aware
operators built on them (Megatron-LM's f and g, sequence parallelism's gathers and
scatters, the differentiable all-to-all) are in `minipar.mappings`.

`group` everywhere is None (the world), a mesh axis name ("dp", "tp", ...)
resolved through the current `Mesh`, or a ProcessGroup. A group of one rank
communicates nothing and records nothing. Byte conventions: see `trace`.

Timing. On the CPU (gloo) a call is stamped on the host: its start when issued, its end when
gloo's thread completes it (the work's future), so an overlapped collective ends where it ended.
On a GPU nothing is synchronized: an asynchronous call runs on the device's communication stream
and a blocking one on the caller's stream, each between two CUDA events that the trace reads
after the step; `wait()` makes the caller's stream wait, not the host (see `minipar.streams`).
"""

from __future__ import annotations

import itertools
import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

from . import runtime, streams, trace
from .mesh import get_mesh, group_name

__all__ = [
    "resolve",
    "size",
    "local_rank",
    "solo",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_reduce_grads",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_p2p",
    "barrier",
]

# The *_tensor collectives warn as deprecated in favour of the *_single forms; we use
# the new names, and silence the warning in this one place should torch route through them.
warnings.filterwarnings("ignore", message=".*_into_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated.*")

# torch before 2.13 has only the *_into_tensor / *_tensor names of the single-tensor collectives
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def resolve(group):
    """-> (ProcessGroup or None for the world, name for the trace, group size)."""
    if isinstance(group, str):
        mesh = get_mesh()
        if mesh is None:
            raise RuntimeError(f"group={group!r} names a mesh axis, but no Mesh exists yet; build one first")
        if mesh.size(group) == 1:
            return None, group, 1
        return mesh.group(group), group, mesh.size(group)
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    return group, group_name(group), n


def size(group=None) -> int:
    return resolve(group)[2]


def local_rank(group=None) -> int:
    """This rank's index inside `group`."""
    pg, _, n = resolve(group)
    return 0 if n == 1 else dist.get_rank(pg)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_SOLO = [False]


@contextmanager
def solo(on: bool = True):
    """In a world of one rank, issue the collectives of one-rank groups anyway (NCCL runs them as a
    local copy). Only for seeing the communication stream at work on a single GPU (the smoke test):
    normally a group of one communicates nothing."""
    old, _SOLO[0] = _SOLO[0], on
    try:
        yield
    finally:
        _SOLO[0] = old


def _alone(n: int) -> bool:
    """Nothing to communicate: a group of one rank (unless `solo` in a world of one)."""
    return n == 1 and not (_SOLO[0] and dist.is_initialized() and dist.get_world_size() == 1)


class TracedWork:
    """An async handle (CPU) whose wait() closes the traced span."""

    def __init__(self, work, ev: trace.Event, tensor: torch.Tensor, after=None):
        self.work, self.ev, self.tensor, self.after, self.done = work, ev, tensor, after, False
        self.finished_at = None
        if work is not None and hasattr(work, "get_future"):
            # gloo completes a collective on its own thread: stamp that moment, so an
            # overlapped collective ends on the timeline where it ended, not where it was waited on.
            try:
                work.get_future().add_done_callback(
                    lambda _: setattr(self, "finished_at", time.perf_counter())
                )
            except RuntimeError:  # a backend without futures: fall back to the wait time
                pass

    def wait(self):
        if not self.done:
            if self.work is not None:
                with runtime.waiting(self.waiting_for()):  # what the deadlock detector reports
                    self.work.wait()
            if self.after is not None:
                self.after()
            self.ev.end = self.finished_at or time.perf_counter()
            trace.record(self.ev)
            self.done = True
        return self.tensor

    def waiting_for(self) -> str:
        peer = self.ev.meta.get("peer")
        if peer is not None:
            return f"{self.ev.name} {'to' if self.ev.name == 'send' else 'from'} rank {peer}"
        return f"{self.ev.name} on {self.ev.axis}"


class _Done:
    """The handle of a communication that had nothing to do (a group of one)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def wait(self):
        return self.tensor


class StreamWork:
    """The handle of a call queued on a device stream: wait() makes the caller's stream wait for
    its end event; the host does not wait."""

    def __init__(self, dev, end, tensor: torch.Tensor, done: bool = False):
        self.dev, self.end, self.tensor, self.done = dev, end, tensor, done

    def wait(self):
        if not self.done:
            self.dev.current().wait_event(self.end)
            self.done = True
        return self.tensor


def _on_stream(dev, issue, evs, uses, async_op: bool, after=None):
    """Queue `issue()` (it starts the backend's works and returns them) on the communication stream
    (async) or the caller's stream, between two timing events. Returns the end event."""
    caller = dev.current()
    stream = dev.comm() if async_op else caller
    if stream is not caller:
        stream.wait_stream(caller)  # the inputs were written on the caller's stream
    start, end = dev.event(), dev.event()
    with dev.use(stream):
        start.record(stream)
        for work in issue():
            if work is not None:
                work.wait()  # NCCL: this stream waits for the collective; the host does not
        if after is not None:
            after()
        end.record(stream)
    for t in uses:  # memory the stream still uses is not recycled under it
        dev.keep(t, stream)
    for ev in evs:
        trace.record_timed(ev, start, end, dev)
    return end


def _run(op, name, axis, payload, wire, tensor, async_op, after=None, uses=(), result=None, **meta):
    """Issue `op` (traced); `tensor` is what it writes, `uses` what else it reads, `result` what
    the handle returns (default `tensor`)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ev = trace.Event(
        rank, name, "comm", time.perf_counter(), 0.0, axis=axis, bytes=payload, wire_bytes=wire, meta=meta
    )
    dev = streams.active()
    if dev is not None:
        end = _on_stream(dev, lambda: [op(True)], [ev], (tensor, *uses), async_op, after)
        handle = StreamWork(dev, end, tensor, done=not async_op)  # blocking: it ran on the caller's stream
    else:
        handle = TracedWork(op(async_op), ev, tensor, after)
    if result is not None:
        handle.tensor = result
    return handle if async_op else handle.wait()


# ----------------------------------------------------------------------------- collectives
def all_reduce(t: torch.Tensor, op: str = "sum", group=None, async_op: bool = False):
    """In place. op: "sum", "avg", "max", "min" (avg = sum then divide: gloo has no AVG)."""
    pg, name, n = resolve(group)
    if _alone(n):
        return _Done(t) if async_op else t
    S = _nbytes(t)
    after = (lambda: t.div_(n)) if op == "avg" else None
    return _run(
        lambda a: dist.all_reduce(t, _OPS["sum" if op == "avg" else op], group=pg, async_op=a),
        "all_reduce",
        name,
        S,
        2 * (n - 1) / n * S,
        t,
        async_op,
        after,
    )


def all_gather(
    t: torch.Tensor, dim: int = 0, group=None, async_op: bool = False, out: torch.Tensor | None = None
):
    """Concatenate every rank's `t` along `dim`; returns a new tensor, or fills `out`
    (dim 0 only: a preallocated buffer, e.g. ZeRO-3's flat parameter)."""
    pg, name, n = resolve(group)
    if _alone(n):
        if out is not None and out.data_ptr() != t.data_ptr():
            out.copy_(t)
        t = t if out is None else out
        return _Done(t) if async_op else t
    src = t.movedim(dim, 0).contiguous()
    if out is not None and (dim != 0 or out.shape != (n * src.shape[0], *src.shape[1:])):
        raise ValueError(
            f"all_gather(out=) needs dim=0 and out of shape {(n * src.shape[0], *src.shape[1:])}"
        )
    out = (
        torch.empty((n * src.shape[0], *src.shape[1:]), dtype=t.dtype, device=t.device)
        if out is None
        else out
    )
    S = _nbytes(out)
    return _run(
        lambda a: _all_gather_single(out, src, group=pg, async_op=a),
        "all_gather",
        name,
        S,
        (n - 1) / n * S,
        out,
        async_op,
        uses=(src,),
        result=out.movedim(0, dim),
    )


def reduce_scatter(t: torch.Tensor, dim: int = 0, op: str = "sum", group=None, async_op: bool = False):
    """Sum every rank's `t`, keep this rank's 1/n slice along `dim`; returns a new tensor."""
    pg, name, n = resolve(group)
    if _alone(n):
        return _Done(t) if async_op else t
    if t.shape[dim] % n:
        raise ValueError(
            f"reduce_scatter along dim {dim} of size {t.shape[dim]} needs a multiple of {n} ranks"
        )
    src = t.movedim(dim, 0).contiguous()
    out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=t.dtype, device=t.device)
    S = _nbytes(src)
    after = (lambda: out.div_(n)) if op == "avg" else None
    return _run(
        lambda a: _reduce_scatter_single(out, src, _OPS["sum" if op == "avg" else op], group=pg, async_op=a),
        "reduce_scatter",
        name,
        S,
        (n - 1) / n * S,
        out,
        async_op,
        after,
        uses=(src,),
        result=out.movedim(0, dim),
    )


def all_to_all(
    t: torch.Tensor, output_split_sizes=None, input_split_sizes=None, group=None, async_op: bool = False
):
    """all_to_all_single along dim 0, with optional uneven splits (rows sent to / received from each rank)."""
    pg, name, n = resolve(group)
    if _alone(n):
        return _Done(t) if async_op else t
    t = t.contiguous()
    rows = sum(output_split_sizes) if output_split_sizes is not None else t.shape[0]
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    row_bytes = t.element_size() * (t[0].numel() if t.shape[0] else int(torch.tensor(t.shape[1:]).prod()))
    me = dist.get_rank(pg)
    own = (input_split_sizes[me] if input_split_sizes is not None else t.shape[0] // n) * row_bytes
    S = _nbytes(t)
    wire = S - own  # the rows a rank sends itself never leave it
    run = lambda a: dist.all_to_all_single(
        out, t, output_split_sizes, input_split_sizes, group=pg, async_op=a
    )
    return _run(run, "all_to_all", name, S, wire, out, async_op, uses=(t,))


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    """In place, from global rank `src`."""
    pg, name, n = resolve(group)
    if _alone(n):
        return _Done(t) if async_op else t
    S = _nbytes(t)
    me = dist.get_rank()
    return _run(
        lambda a: dist.broadcast(t, src, group=pg, async_op=a),
        "broadcast",
        name,
        S,
        S if me == src else 0,
        t,
        async_op,
    )


def all_reduce_grads(params, group=None, scale: float = 1.0) -> None:
    """Sum the gradients of `params` over `group` in one flat all-reduce (one bucket rather than
    one message per tensor), times `scale`, in place. Parameters without a gradient are skipped."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p.grad))


def barrier(group=None) -> None:
    pg, _, n = resolve(group)
    if n > 1:
        dist.barrier(group=pg)


# ----------------------------------------------------------------------------- point to point
def isend(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> TracedWork:
    """Post a send to global rank `dst`."""
    pg, name, _ = resolve(group)
    S, src = _nbytes(t), t.contiguous()
    return _run(
        lambda a: dist.isend(src, dst, group=pg, tag=tag), "send", name, S, S, t, True, uses=(src,), peer=dst
    )


def irecv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> TracedWork:
    """Post a receive into `t` from global rank `src`."""
    pg, name, _ = resolve(group)
    return _run(
        lambda a: dist.irecv(t, src, group=pg, tag=tag), "recv", name, _nbytes(t), 0, t, True, peer=src
    )


def send(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> torch.Tensor:
    return irecv(t, src, group, tag).wait()


_ROUNDS = itertools.count()


def batch_p2p(sends=(), recvs=(), group=None) -> list[TracedWork]:
    """Post many sends [(tensor, dst)] and receives [(tensor, src)] at once (batch_isend_irecv),
    so that no pairing order can deadlock. Returns one handle per op, sends first."""
    pg, name, _ = resolve(group)
    ops = [dist.P2POp(dist.isend, t.contiguous(), d, group=pg) for t, d in sends]
    ops += [dist.P2POp(dist.irecv, t, s, group=pg) for t, s in recvs]
    if not ops:
        return []
    rank, step = dist.get_rank(), next(_ROUNDS)  # one round id for the messages of one step
    start = time.perf_counter()
    evs = [
        trace.Event(
            rank,
            "send",
            "comm",
            start,
            0.0,
            axis=name,
            bytes=_nbytes(t),
            wire_bytes=_nbytes(t),
            meta={"peer": d, "round": step},
        )
        for t, d in sends
    ]
    evs += [
        trace.Event(
            rank, "recv", "comm", start, 0.0, axis=name, bytes=_nbytes(t), meta={"peer": s, "round": step}
        )
        for t, s in recvs
    ]
    tensors = [t for t, _ in sends] + [t for t, _ in recvs]
    dev = streams.active()
    if dev is not None:  # one step on the communication stream: every op between the same two events
        end = _on_stream(dev, lambda: dist.batch_isend_irecv(ops), evs, [op.tensor for op in ops], True)
        return [StreamWork(dev, end, t) for t in tensors]
    works = dist.batch_isend_irecv(ops)
    return [TracedWork(w, e, t) for w, e, t in zip(works, evs, tensors)]
