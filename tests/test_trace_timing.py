"""The GPU timing path (minipar.streams, comm's stream path, trace.resolve) on the CPU, with fake
streams and events: collectives run on a communication stream between two events, the compute
stream waits for them on the device, nothing waits on the host until the trace is read after the
step, and the resolved timeline shows the overlap that happened."""

import time
from contextlib import contextmanager

import pytest
import torch

from minipar import comm, launch, streams, trace
from minipar.dp import train_ddp
from minipar.model import GPTConfig, train_reference
from minipar.zero import train_zero

CFG = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)


class FakeStream:
    """A stream is a queue: `t` is the device time (s) at which the work queued so far ends."""

    def __init__(self, dev, name):
        self.dev, self.name, self.t = dev, name, 0.0

    def wait_stream(self, other):
        self.dev.log.append(("wait_stream", self.name, other.name))
        self.t = max(self.t, other.t)

    def wait_event(self, ev):
        self.dev.log.append(("wait_event", self.name, ev.id))
        self.t = max(self.t, ev.t)


class FakeEvent:
    def __init__(self, dev):
        self.dev, self.t, self.id = dev, None, len(dev.events)
        dev.events.append(self)

    def record(self, stream):
        self.t, self.stream = self.dev.clock(stream), stream.name
        self.dev.log.append(("record", stream.name, self.id))

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        return (end.t - self.t) * 1e3

    def synchronize(self):
        self.dev.syncs += 1
        self.dev.syncs_outside_resolve += not self.dev.resolving


class FakeDevice:
    """CudaStreams' interface over fake streams. With `follow_host`, queued work runs as soon as
    it is queued (the device clock is the host's); otherwise the test advances streams by hand."""

    def __init__(self, follow_host=False):
        self.follow_host, self.log, self.events, self.syncs = follow_host, [], [], 0
        self.resolving, self.syncs_outside_resolve, self.resolves = False, 0, 0
        self.compute, self.comm_stream = FakeStream(self, "compute"), FakeStream(self, "comm")
        self._current = self.compute

    def current(self):
        return self._current

    def comm(self):
        return self.comm_stream

    def event(self):
        return FakeEvent(self)

    @contextmanager
    def use(self, stream):
        old, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = old

    def keep(self, tensor, stream):
        self.log.append(("keep", stream.name))

    def clock(self, stream):
        if self.follow_host:
            stream.t = max(stream.t, time.perf_counter())
        return stream.t

    def run(self, stream, seconds):  # queue `seconds` of kernels on `stream`
        stream.t += seconds


def test_device_timestamps_resolve_after_the_step_and_show_the_overlap():
    dev = FakeDevice()
    trace.reset()
    with streams.override(dev):
        start = trace.now()  # backward begins: compute stream at 0
        dev.run(dev.compute, 0.004)  # 4 ms of backward kernels queued
        dev.comm_stream.wait_stream(dev.compute)  # a bucket's all-reduce, as comm queues it
        a, b = dev.event(), dev.event()
        a.record(dev.comm_stream)
        dev.run(dev.comm_stream, 0.003)
        b.record(dev.comm_stream)
        trace.record_timed(trace.Event(0, "all_reduce", "comm", 0.0, 0.0, axis="dp"), a, b)
        dev.run(dev.compute, 0.006)  # backward goes on meanwhile
        trace.record_span("B", start)
        assert dev.syncs == 0  # nothing has waited for the device yet
        before = time.perf_counter()
        evs = {e.name: e for e in trace.events()}  # reading the trace resolves it: after the step
    assert dev.syncs == 2 + 1  # the two spans' end events and one anchor, once per step
    B, ar = evs["B"], evs["all_reduce"]
    assert B.duration == pytest.approx(0.010, abs=1e-9) and ar.duration == pytest.approx(0.003, abs=1e-9)
    assert ar.start - B.start == pytest.approx(0.004, abs=1e-9)  # on the device's clock, not the host's
    assert before - 1.0 < B.start < B.end <= time.perf_counter()  # anchored to the host clock
    assert B.start < ar.start < ar.end < B.end  # the overlap the timeline will draw
    trace.events()
    assert dev.syncs == 3  # resolved once, not per call


def _on_fake_streams():
    dev = FakeDevice(follow_host=True)
    torch.cuda.synchronize = None  # any call would fail: the path must never make one
    resolve = trace.resolve

    def counted():  # the only place allowed to wait for the device
        dev.resolving, dev.resolves = True, dev.resolves + 1
        resolve()
        dev.resolving = False

    trace.resolve = counted
    with streams.override(dev):
        trace.reset()
        ddp = train_ddp(CFG, steps=2, bucket_mb=0.01)
        resolves_while_training = dev.resolves
        ddp_evs = trace.events()
        ddp_log = list(dev.log)
        dev.log.clear()
        trace.reset()
        zero = train_zero(CFG, 3, steps=2)
        zero_evs = trace.events()
    return dict(
        ddp=ddp,
        zero=zero,
        ddp_evs=ddp_evs,
        zero_evs=zero_evs,
        ddp_log=ddp_log,
        zero_log=dev.log,
        resolves_while_training=resolves_while_training,
        syncs=dev.syncs,
        syncs_outside_resolve=dev.syncs_outside_resolve,
        stream_of={e.id: e.stream for e in dev.events},
    )


def test_ddp_buckets_and_zero3_prefetch_run_on_the_comm_stream_without_host_waits():
    res = launch(_on_fake_streams, 2)
    ref = train_reference(CFG, 2, 8, 0)
    for r in res:
        assert r["ddp"]["losses"] == pytest.approx(ref.losses, abs=1e-6)  # same numbers as the CPU path
        assert r["zero"]["losses"] == pytest.approx(ref.losses, abs=1e-6)
        # the device is waited for only when the trace is read: once per step (train_steps), never per call
        assert r["syncs_outside_resolve"] == 0 and r["syncs"] > 0 and r["resolves_while_training"] == 2
    r0 = res[0]
    log, stream_of = r0["ddp_log"], r0["stream_of"]
    # every bucket's all-reduce: the comm stream first waits for compute, then runs between two events
    records = [i for i, x in enumerate(log) if x[0] == "record" and x[1] == "comm"]
    assert records and all(log[i - 1] == ("wait_stream", "comm", "compute") for i in records[::2])
    # ... and compute waits for each one's end event before using the bucket
    waited = {x[2] for x in log if x[0] == "wait_event" and x[1] == "compute"}
    ends = [x[2] for x in log if x[0] == "record" and x[1] == "comm"][1::2]
    assert set(ends) == waited and all(stream_of[i] == "comm" for i in waited)
    # the timeline shows the overlap: in each step some bucket's all-reduce starts inside backward
    evs = r0["ddp_evs"]
    reduces = [e for e in evs if e.name == "all_reduce"]
    backward = [e for e in evs if e.name == "B"]
    assert len(backward) == 2 and all(any(b.start < e.start < b.end for e in reduces) for b in backward)
    # ZeRO-3: the prefetched all-gathers and the reduce-scatters run on the comm stream too
    zlog = r0["zero_log"]
    comm_records = [x for x in zlog if x[0] == "record" and x[1] == "comm"]
    n_comm = len([e for e in r0["zero_evs"] if e.cat == "comm"])
    assert len(comm_records) == 2 * n_comm  # a start and an end event per traced collective
    assert any(x[0] == "wait_event" and x[1] == "compute" for x in zlog)


def _solo():
    trace.reset()
    comm.all_reduce(torch.ones(3))  # a group of one: nothing to do, nothing recorded
    with comm.solo():
        comm.all_reduce(torch.ones(3), op="avg")  # issued anyway (the single-GPU smoke test's DDP)
    return [(e.name, e.bytes) for e in trace.events()]


def test_solo_issues_the_collectives_of_a_world_of_one():
    assert launch(_solo, 1) == [[("all_reduce", 12)]]
