"""Iteration-level scheduling: Orca's continuous batching (Yu et al. 2022, "Orca: A Distributed
Serving System for Transformer-Based Generative Models", OSDI, Sec. 3.2-3.3), vLLM-shaped.

A *static* (request-level) batch runs until its longest request finishes: a request that
arrives meanwhile waits for the whole batch, and a short request's slot idles after it is
done. Orca schedules one *iteration* at a time instead. Every step

    1. every running sequence decodes one token,
    2. finished sequences leave (their cache blocks return to the pool),
    3. waiting requests join, first come first served, while the batch has room (`max_batch`)
       and the block manager can promise the blocks of their whole life (see `blocks.py`);
       a joining request runs its prefill (the whole prompt, one pass) in this same step.

Each scheduled work yields exactly one token: a prefill yields the first, a decode the next.

Pipeline parallelism. With p stages one step occupies one stage at a time, so p steps are in
flight: the scheduler keeps p *micro-batches* of sequences (vLLM's "virtual engines") and
step k serves micro-batch k mod p. A sequence's tokens come back from the last stage exactly
p ticks later, in time for its micro-batch's next turn. A single request therefore pays p
stage times per token (PP raises latency), while p busy micro-batches keep every stage busy.

Data parallelism. `Frontend` holds one scheduler per replica and a `Router` that sends each
arriving request to the replica with the least outstanding work. It is deterministic: every
rank runs the same frontend on the same clock readings and so agrees on every decision
without exchanging the decisions themselves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockManager, blocks_for

__all__ = ["Request", "Work", "Step", "Scheduler", "Router", "Frontend", "POLICIES"]

POLICIES = ("continuous", "static")


@dataclass(frozen=True)
class Request:
    id: int
    prompt: tuple
    max_new_tokens: int
    arrival: float = 0.0  # seconds after the start

    @property
    def cache_tokens(self) -> int:
        """K/V slots the request holds at its end: the prompt and every generated token but the
        last (which is returned, never fed back)."""
        return len(self.prompt) + self.max_new_tokens - 1


@dataclass(frozen=True)
class Work:
    """One sequence's part of a step: feed positions start..start+tokens-1, get one token."""

    seq: int
    start: int
    tokens: int
    table: tuple  # the sequence's block table after this step's growth
    last: bool  # the token it yields is the request's final one

    @property
    def prefill(self) -> bool:
        return self.start == 0


@dataclass
class Step:
    tick: int
    micro_batch: int
    works: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(w.tokens for w in self.works)

    def __bool__(self) -> bool:
        return bool(self.works)


class Scheduler:
    """One replica's iteration-level scheduler over a shared pool of KV-cache blocks.

    `policy="static"` is the request-level baseline: a micro-batch admits only when it is
    empty, so nobody joins a running batch."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_batch: int,
        micro_batches: int = 1,
        policy: str = "continuous",
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: choose one of {POLICIES}")
        if max_batch < 1 or micro_batches < 1:
            raise ValueError(f"max_batch={max_batch} and micro_batches={micro_batches} must be >= 1")
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_batch, self.micro_batches, self.policy = max_batch, micro_batches, policy
        self.waiting: deque[Request] = deque()
        self.running: list[list[list]] = [[] for _ in range(micro_batches)]  # [request, tokens yielded]
        self.leaving: list[int] = []  # finished last step; their blocks return at the next one
        self.tick = 0
        self.cache_waits = 0  # steps in which an arrived request had room in the batch but no blocks

    def add(self, request: Request) -> None:
        need = blocks_for(request.cache_tokens, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request {request.id} needs {need} cache blocks over its life but the cache has "
                f"{self.blocks.num_blocks}: it could never be admitted"
            )
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.running) or bool(self.leaving)

    def outstanding(self) -> int:
        """Tokens still to process: whole waiting requests, the rest of the running ones."""
        return sum(len(r.prompt) + r.max_new_tokens for r in self.waiting) + sum(
            r.max_new_tokens - n for mb in self.running for r, n in mb
        )

    def can_join(self, request: Request, now: float, batch: int) -> bool:
        """The admission rule: arrived, room in the batch, and blocks for its whole life."""
        return (
            request.arrival <= now and batch < self.max_batch and self.blocks.can_admit(request.cache_tokens)
        )

    def step(self, now: float) -> Step:
        """Schedule the next iteration (for micro-batch tick mod p) at time `now`."""
        v = self.tick % self.micro_batches
        step, bm, batch = Step(self.tick, v), self.blocks, self.running[v]
        for seq in self.leaving:  # their last step has been issued: reuse is safe
            bm.release(seq)
        self.leaving = []
        for entry in batch:  # 1. decode
            r, n = entry
            pos = len(r.prompt) + n - 1  # the position of the token yielded last time
            step.works.append(Work(r.id, pos, 1, tuple(bm.grow(r.id, pos + 1)), n + 1 == r.max_new_tokens))
        if self.policy == "continuous" or not batch:  # 3. join (static: only an empty batch)
            while self.waiting and self.can_join(self.waiting[0], now, len(batch)):
                r = self.waiting.popleft()
                bm.admit(r.id, r.cache_tokens)
                step.works.append(
                    Work(r.id, 0, len(r.prompt), tuple(bm.grow(r.id, len(r.prompt))), r.max_new_tokens == 1)
                )
                batch.append([r, 0])
            head = self.waiting[0] if self.waiting else None
            if head is not None and head.arrival <= now and len(batch) < self.max_batch:
                self.cache_waits += 1  # the cache is full: admission waits
        for entry in batch:  # every work yields one token
            entry[1] += 1
        self.leaving = [r.id for r, n in batch if n == r.max_new_tokens]  # 2. leave
        batch[:] = [e for e in batch if e[1] < e[0].max_new_tokens]
        self.tick += 1
        return step


class Router:
    """Data parallelism's front door: each request goes to the replica with the fewest
    outstanding tokens (ties: the lowest index), a join-the-shortest-queue rule."""

    def __init__(self, schedulers: list[Scheduler]):
        self.schedulers = schedulers

    def route(self, request: Request) -> int:
        r = min(range(len(self.schedulers)), key=lambda i: (self.schedulers[i].outstanding(), i))
        self.schedulers[r].add(request)
        return r


class Frontend:
    """Every replica's scheduler, the router and the arrival queue, advanced one tick at a time.

    `advance(now)` routes the requests that have arrived by `now` and returns one Step per
    replica. With p pipeline stages the step of tick k leaves the last stage at tick k+p-1."""

    def __init__(
        self,
        requests,
        replicas: int = 1,
        pp: int = 1,
        max_batch: int = 8,
        num_blocks: int = 64,
        block_size: int = 4,
        policy: str = "continuous",
    ):
        self.schedulers = [Scheduler(num_blocks, block_size, max_batch, pp, policy) for _ in range(replicas)]
        self.router = Router(self.schedulers)
        self.pending = deque(sorted(requests, key=lambda r: (r.arrival, r.id)))
        self.pp, self.tick, self.last_busy = pp, 0, -1
        self.replica_of: dict[int, int] = {}

    def advance(self, now: float) -> list[Step]:
        while self.pending and self.pending[0].arrival <= now:
            r = self.pending.popleft()
            self.replica_of[r.id] = self.router.route(r)
        steps = [s.step(now) for s in self.schedulers]
        if any(steps):
            self.last_busy = self.tick
        self.tick += 1
        return steps

    @property
    def drained(self) -> bool:
        """No request in any scheduler and no step still inside the pipeline."""
        return not any(s.busy for s in self.schedulers) and self.tick > self.last_busy + self.pp - 1

    @property
    def done(self) -> bool:
        return not self.pending and self.drained

    def next_arrival(self) -> float | None:
        return self.pending[0].arrival if self.pending else None
