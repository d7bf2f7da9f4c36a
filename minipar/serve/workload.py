"""Requests, what serving them measured, and the same scheduler on a modeled clock.

Workload: `make_requests` draws prompts, lengths and Poisson arrivals (exponential gaps of
mean 1/rate, the usual open-loop serving benchmark) from one seeded generator, so the same
seed gives the same trace in every layout.

Metrics (per request; the usual serving vocabulary):
    TTFT = time of the first token - arrival      (queueing + prefill)
    ITL  = gaps between consecutive tokens        (inter-token latency, one per decode)
    throughput = generated tokens / (last token's time - first arrival)

`simulate` runs the very `Frontend` the ranks run, but advances a modeled clock by a cost
function per tick instead of reading the wall clock; with a roofline cost from
`minipar.plan.serving` it says what the schedule would do on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..trace import Event
from .scheduler import Frontend, Request

__all__ = [
    "make_requests",
    "Record",
    "summarize",
    "format_summary",
    "simulate",
    "Simulated",
    "parse_range",
    "reference",
]


def parse_range(value) -> tuple[int, int]:
    """4 -> (4, 4); "4:12" -> (4, 12) (inclusive). Raises ValueError on anything else."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
    elif isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    else:
        text = str(value)
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi if hi else lo)
    if not (isinstance(lo, int) and isinstance(hi, int)):
        raise ValueError(f"{value!r} is not a whole number or a range LO:HI")
    return lo, hi


def make_requests(
    n: int,
    vocab: int,
    prompt_len=(4, 12),
    max_new_tokens=(4, 12),
    arrival_rate: float | None = None,
    seed: int = 0,
) -> list[Request]:
    """`n` requests: lengths uniform in the inclusive ranges, tokens uniform over the vocabulary,
    arrivals a Poisson process of `arrival_rate` per second (None: all at time 0)."""
    (p_lo, p_hi), (g_lo, g_hi) = parse_range(prompt_len), parse_range(max_new_tokens)
    gen = torch.Generator().manual_seed(1_000_033 + seed)
    plen = torch.randint(p_lo, p_hi + 1, (n,), generator=gen).tolist()
    glen = torch.randint(g_lo, g_hi + 1, (n,), generator=gen).tolist()
    gaps = (
        -torch.log1p(-torch.rand(n, generator=gen, dtype=torch.float64)) / arrival_rate
        if arrival_rate
        else torch.zeros(n, dtype=torch.float64)
    )
    arrivals = gaps.cumsum(0).tolist()
    return [
        Request(i, tuple(torch.randint(0, vocab, (plen[i],), generator=gen).tolist()), glen[i], arrivals[i])
        for i in range(n)
    ]


@dataclass
class Record:
    """What one request got: its tokens and when each left the last stage (seconds after the start)."""

    id: int
    prompt: list
    arrival: float
    tokens: list = field(default_factory=list)
    times: list = field(default_factory=list)
    replica: int = 0

    @property
    def ttft(self) -> float:
        return self.times[0] - self.arrival

    @property
    def itl(self) -> list:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "prompt": list(self.prompt),
            "tokens": list(self.tokens),
            "ttft": self.ttft,
            "itl": self.itl,
        }


def summarize(records: list[Record]) -> dict:
    """Throughput and TTFT/ITL percentiles (p50, p99) of a finished run."""
    ttft = np.array([r.ttft for r in records])
    itl = np.array([x for r in records for x in r.itl]) if any(r.itl for r in records) else np.zeros(1)
    tokens = sum(len(r.tokens) for r in records)
    span = max(r.times[-1] for r in records) - min(r.arrival for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "seconds": span,
        "throughput": tokens / span,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "itl_p50": float(np.percentile(itl, 50)),
        "itl_p99": float(np.percentile(itl, 99)),
    }


def format_summary(s: dict, unit: str = "ms") -> str:
    k = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    return (
        f"{s['requests']} requests, {s['tokens']} tokens in {s['seconds']:.3g} s: "
        f"{s['throughput']:,.1f} tokens/s; TTFT p50 {s['ttft_p50'] * k:.3g} {unit}, p99 {s['ttft_p99'] * k:.3g} "
        f"{unit}; ITL p50 {s['itl_p50'] * k:.3g} {unit}, p99 {s['itl_p99'] * k:.3g} {unit}"
    )


@dataclass
class Simulated:
    records: list  # Record per request (tokens are placeholders: the clock is modeled)
    events: list  # trace.Events, one row per request: waiting, prefill, decoding (merged while unbroken)
    ticks: list  # (start, end, [per-replica Step]) of every tick

    def summary(self) -> dict:
        return summarize(self.records)


def simulate(
    requests,
    step_time,
    replicas: int = 1,
    pp: int = 1,
    max_batch: int = 8,
    num_blocks: int = 64,
    block_size: int = 4,
    policy: str = "continuous",
    hop: float = 0.0,
) -> Simulated:
    """Serve `requests` on a modeled clock: the ranks' `Frontend`, with each tick lasting the
    longest `step_time(step)` over the replicas' steps in flight on any stage (the engine ticks
    in lockstep), plus `hop` per tick when pp > 1. An idle engine jumps to the next arrival."""
    front = Frontend(requests, replicas, pp, max_batch, num_blocks, block_size, policy)
    recs = {r.id: Record(r.id, list(r.prompt), r.arrival) for r in requests}
    inflight, ticks, events, clock, decoding = [], [], [], 0.0, {}
    while not front.done:
        nxt = front.next_arrival()
        if front.drained and nxt is not None and nxt > clock:
            clock = nxt
        steps = front.advance(clock)
        inflight = [steps] + inflight[: pp - 1]  # inflight[s]: the steps stage s works on
        dt = max((step_time(st) for sts in inflight for st in sts if st), default=0.0)
        dt += hop if pp > 1 and dt else 0.0
        ticks.append((clock, clock + dt, steps))
        if len(inflight) == pp:  # the oldest steps leave the last stage now
            for r, st in enumerate(inflight[-1]):
                for w in st.works:
                    rec = recs[w.seq]
                    rec.replica, start = r, ticks[st.tick][0]
                    rec.tokens.append(0)
                    rec.times.append(clock + dt)
                    if w.prefill:
                        events.append(
                            Event(w.seq, "wait", "compute", rec.arrival, start, meta={"kind": "opt"})
                        )
                    last = decoding.get(w.seq)
                    if (
                        not w.prefill and last is not None and last.end == start
                    ):  # one bar while it keeps decoding
                        last.end = clock + dt
                        continue
                    events.append(
                        Event(
                            w.seq,
                            "prefill" if w.prefill else "decode",
                            "compute",
                            start,
                            clock + dt,
                            meta={"kind": "B" if w.prefill else "F"},
                        )
                    )
                    if not w.prefill:
                        decoding[w.seq] = events[-1]
        clock += dt
    return Simulated([recs[r.id] for r in requests], events, ticks)


@torch.no_grad()
def reference(model, request: Request) -> tuple[list, float]:
    """`GPT.generate`'s greedy tokens for one request, and the smallest gap between the best and
    the second-best logit over its steps (from one forward over the finished text: a causal model's
    logits at position i see only positions <= i). A gap near fp32 rounding (~1e-7 for the tiny
    models here) could flip an argmax between two correct implementations, so a parity claim
    needs a gap well above it."""
    n = len(request.prompt)
    out = model.generate(torch.tensor([request.prompt]), request.max_new_tokens)
    top = model(out[:, -model.cfg.seq :])[0, n - 1 - out.shape[1] : -1].topk(2, dim=-1).values
    return out[0, n:].tolist(), (top[:, 0] - top[:, 1]).min().item()
