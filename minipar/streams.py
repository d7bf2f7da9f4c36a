"""Streams, and timestamps taken on them: how communication overlaps compute on a GPU, and how
the trace times it without stopping the GPU.

On a GPU the host only *queues* work: kernels and NCCL collectives run later, in order, on
streams. The host's clock says when work was queued, not when it ran; calling
`torch.cuda.synchronize()` around each collective makes the two agree, but it also drains every
stream, so communication can never overlap compute (and the timeline would say it did not). What
torch's DDP and FSDP do instead, and `minipar.comm` too:

* an asynchronous collective is queued on a *communication stream* (one per device), after that
  stream waits for the compute stream, so the collective sees its inputs; `handle.wait()` makes
  the compute stream wait for the collective. Both waits are on the device: the host runs on, and
  backward's kernels keep the compute stream busy while the comm stream reduces a bucket.
* its start and end are CUDA events recorded on the stream that runs it; compute spans are
  events on the compute stream. The trace keeps the events and converts them to host seconds
  only when asked, after the step (`trace.resolve`): one anchor event recorded last, whose host
  time is read once it has completed, gives every event's time as
      t(e) = t_host(anchor) - elapsed(e, anchor).
* a tensor a collective reads or writes on the comm stream is marked as used there
  (`Tensor.record_stream`), so the caching allocator does not hand its memory to the compute
  stream while the collective still needs it.

On the CPU (gloo) none of this applies: `active()` is None and `minipar.comm` keeps its host-side
timing (gloo runs collectives on its own threads and stamps their completion). Tests replace the
CUDA calls with fakes through `override(...)`, so the same path runs on a CPU-only machine.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .runtime import device

__all__ = ["CudaStreams", "active", "override"]


class CudaStreams:
    """The device calls the timing path needs, for this rank's GPU. A fake with the same methods
    (see tests/test_trace_timing.py) lets the CPU run the same code."""

    def __init__(self, dev: torch.device):
        self.device = dev
        self._comm = None

    def current(self):
        return torch.cuda.current_stream(self.device)

    def comm(self):
        """This device's communication stream, made on first use."""
        if self._comm is None:
            self._comm = torch.cuda.Stream(self.device)
        return self._comm

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def keep(self, tensor: torch.Tensor, stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)


_ACTIVE: dict = {}
_OVERRIDE: list = [None]


def active():
    """The streams of this rank's device, or None on the CPU (or a fake, under `override`)."""
    if _OVERRIDE[0] is not None:
        return _OVERRIDE[0]
    dev = device()
    if dev.type != "cuda":
        return None
    if dev not in _ACTIVE:
        _ACTIVE[dev] = CudaStreams(dev)
    return _ACTIVE[dev]


@contextmanager
def override(streams):
    """Use `streams` (a fake with CudaStreams' methods) as this rank's device streams."""
    old, _OVERRIDE[0] = _OVERRIDE[0], streams
    try:
        yield streams
    finally:
        _OVERRIDE[0] = old
