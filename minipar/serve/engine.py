"""The serving loop on every rank, and `serve()`, its Python entry point.

Layout. The mesh is pp x dp x ep x tp (tp innermost, as in training). A *replica* is the set of
ranks that share a (dp, ep) coordinate: its pp stages, each split over tp. Each replica serves
its own requests with its own scheduler and KV cache; under ep the replicas' attention is data
parallel and their MoE blocks share the experts (DeepSeek-V3's decoding layout: attention DP,
experts EP), so ep ranks step together even when one has nothing to do.

One tick, on every rank (the engine runs in lockstep):

    now    = rank 0's clock, broadcast (the control plane: vLLM's driver broadcasts its
             scheduler output to the workers; here every rank runs the same deterministic
             `Frontend`, so the time alone is enough)
    steps  = frontend.advance(now)                  one Step per replica
    stage s works on its replica's step of tick k - s
    exchange (one batch of point-to-point ops, so no pairing order can deadlock):
             hidden states [N, h] from stage s-1; stage 0 gets back the tokens sampled p ticks ago
    compute  embed (stage 0) -> blocks with paged attention -> argmax (last stage)

A token's time is taken when the last stage has it. Everything the ranks do is traced
(`trace.span` per step, every collective through `comm`), so the CLI draws the timeline.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.std import tqdm

from .. import comm, runtime, trace
from ..compose import ParallelConfig
from ..mesh import Mesh
from ..model import GPTConfig
from ..runtime import launch
from ..validation import Problems
from .blocks import blocks_for
from .runner import StageRunner
from .scheduler import POLICIES, Frontend, Request
from .workload import Record, summarize

__all__ = [
    "ServeConfig",
    "ServeResult",
    "serve",
    "serve_rank",
    "RankLoop",
    "check_serve",
    "check_requests",
    "sizes_ok",
]


@dataclass(frozen=True)
class ServeConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    max_batch: int = 8  # sequences per step (per micro-batch under pp)
    block_size: int = 4  # token slots per KV-cache block
    num_blocks: int | None = None  # blocks per replica; None: max_batch longest requests per micro-batch
    policy: str = "continuous"  # or "static" (request-level batching, the baseline)
    seed: int = 0  # the weights' seed (the reference GPT(cfg, seed))
    timeout: float = 120.0  # seconds any collective, or any one scheduler tick, may take

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ep * self.dp

    @property
    def replicas(self) -> int:
        return self.dp * self.ep

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(dp=self.dp, pp=self.pp, tp=self.tp, ep=self.ep)

    def blocks(self, longest: int) -> int:
        """Cache blocks per replica, for requests of at most `longest` cached tokens."""
        return self.num_blocks or blocks_for(longest, self.block_size) * self.max_batch * self.pp

    def describe(self) -> str:
        return (
            " x ".join(f"{a}{getattr(self, a)}" for a in ("pp", "dp", "ep", "tp") if getattr(self, a) > 1)
            or "1 rank"
        )


def sizes_ok(*values) -> bool:
    """All whole numbers >= 1 (a value the command line could not read is checked elsewhere)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)


def check_serve(
    cfg, sc: ServeConfig, longest_prompt: int | None, longest_request: int | None, p: Problems | None = None
) -> Problems:
    """Every problem of this layout and workload (requests of up to `longest_prompt` prompt tokens
    and `longest_request` prompt + new tokens; None: unknown), one line each. `cfg` is a GPTConfig
    or anything with its fields; a check whose inputs are not valid sizes is skipped (their own
    problems are listed by whoever read them)."""
    p = p if p is not None else Problems()
    t = sc.tp
    p.divides("tp", t, "heads", cfg.heads, "each tp rank holds heads/tp whole attention heads")
    p.divides("tp", t, "vocab", cfg.vocab, "the embedding and head are split by rows over tp (no padding)")
    if sizes_ok(cfg.layers, sc.pp) and cfg.layers % sc.pp:
        p.add(
            f"{p.show('layers', cfg.layers)} must be divisible by {p.name('pp')}={sc.pp}: "
            "every pipeline stage holds the same number of blocks"
        )
    if sizes_ok(sc.ep) and sc.ep > 1 and cfg.experts == 0:
        p.add(f"{p.show('ep', sc.ep)} needs an MoE model: set {p.name('experts')} to a multiple of {sc.ep}")
    if sizes_ok(cfg.experts):
        p.divides("ep", sc.ep, "experts", cfg.experts, "every ep rank holds experts/ep whole experts")
        if sizes_ok(cfg.top_k) and cfg.top_k > cfg.experts:
            p.add(f"{p.show('top_k', cfg.top_k)} must be between 1 and {p.name('experts')}={cfg.experts}")
    if sc.policy not in POLICIES:
        p.add(f"{p.show('policy', sc.policy)}: choose one of {', '.join(POLICIES)}")
    if longest_request is not None and sizes_ok(cfg.seq) and longest_request > cfg.seq:
        p.add(
            f"a request of {longest_prompt} prompt tokens and {longest_request - longest_prompt} new ones "
            f"needs {longest_request} positions but the model has {p.name('seq')}={cfg.seq}: raise "
            f"{p.name('seq')} or shorten {p.name('prompt_len')} / {p.name('max_new_tokens')}"
        )
    if longest_request is not None and sizes_ok(sc.block_size, sc.max_batch, sc.pp, sc.num_blocks or 1):
        need, have = blocks_for(longest_request - 1, sc.block_size), sc.blocks(longest_request - 1)
        if need > have:
            p.add(
                f"{p.show('num_blocks', have)} of {sc.block_size} tokens cannot hold even one request: the "
                f"longest holds {longest_request - 1} tokens in its cache, {need} blocks; raise "
                f"{p.name('num_blocks')} to >= {need} (a cache too small for all requests at once is fine: "
                "admission waits)"
            )
    torchrun_world = int(os.environ["WORLD_SIZE"]) if runtime.is_torchrun() else None
    if torchrun_world and sizes_ok(sc.tp, sc.pp, sc.ep, sc.dp) and torchrun_world != sc.world_size:
        p.add(
            f"torchrun started {os.environ['WORLD_SIZE']} processes but tp*pp*ep*dp = {sc.world_size}: "
            "make --nproc_per_node (times nodes) equal the product"
        )
    return p


@dataclass
class ServeResult:
    records: list  # Record per request, by id
    events: list  # every rank's trace events, merged (wall clock)
    config: ServeConfig
    cache_waits: list = field(default_factory=list)  # per replica: steps in which admission waited for blocks
    free_blocks: list = field(
        default_factory=list
    )  # per replica, after the run (all of them: nothing leaked)
    wall: float = 0.0

    def summary(self) -> dict:
        return summarize(self.records)


def _now(front: Frontend, t0: float) -> float:
    """Rank 0's clock, on every rank. An idle rank 0 first waits for the next arrival (in short
    naps, so that the other ranks' broadcast never waits longer than a collective may)."""
    t = torch.zeros(1, dtype=torch.float64, device=runtime.device())
    if runtime.rank() == 0:
        nxt = front.next_arrival()
        if front.drained and nxt is not None:
            time.sleep(min(0.5, max(0.0, nxt - (runtime.wall() - t0))))
        t[0] = runtime.wall() - t0
    with trace.enabled(False):  # the control plane; the timeline shows the model's work
        comm.broadcast(t, 0)
    return t.item()


class RankLoop:
    """One rank's serving loop (inside `launch`, or a torchrun process): the steps of the last
    p+1 ticks, the stage's model piece, and what is in flight between the stages."""

    def __init__(self, cfg: GPTConfig, sc: ServeConfig, requests: list[Request], progress: bool = False):
        mesh = Mesh(pp=sc.pp, dp=sc.dp, ep=sc.ep, tp=sc.tp)
        self.cfg, self.dev, self.p, self.s = cfg, runtime.device(), sc.pp, mesh.index("pp")
        self.num_blocks = sc.blocks(max(r.cache_tokens for r in requests))
        self.runner = StageRunner(cfg, sc.parallel(), mesh, sc.seed, self.num_blocks, sc.block_size)
        self.front = Frontend(
            requests, sc.replicas, sc.pp, sc.max_batch, self.num_blocks, sc.block_size, sc.policy
        )
        self.me = mesh.index("dp") * sc.ep + mesh.index("ep")  # this rank's replica
        self.peer = {
            k: mesh.rank_of(**{**mesh.coords(), "pp": k % self.p})  # global ranks
            for k in (self.s - 1, self.s + 1, 0, self.p - 1)
        }
        self.recorder = self.runner.last and mesh.index("tp") == 0
        self.by_id = {r.id: r for r in requests}
        self.records: dict[int, Record] = {}
        self.history: list = []  # every replica's steps of the last p+1 ticks, newest first
        self.fed: dict[int, int] = {}  # stage 0: each running sequence's newest token
        self.outbox: list = []  # sends made this tick, posted with the next tick's receives
        self.bar = tqdm(
            total=sum(r.max_new_tokens for r in requests),
            desc=f"serving ({sc.describe()})",
            unit="tok",
            file=sys.stdout,
            disable=not progress or runtime.rank() != 0,
        )

    def run(self) -> dict:
        comm.barrier()
        self.t0 = runtime.wall()
        while not self.front.done:
            runtime.heartbeat()  # a tick that never ends (a bug, a lost message) ends the run, with stacks
            self.history = [self.front.advance(_now(self.front, self.t0))] + self.history[: self.p]
            mine = self.history[self.s][self.me] if len(self.history) > self.s else None  # tick k - s
            act = self.exchange(mine)
            if self.runner.must_run(mine):
                self.compute(mine, act)
            if len(self.history) >= self.p:  # the steps leaving the last stage now
                self.bar.update(sum(len(st.works) for st in self.history[self.p - 1]))
        self.bar.close()
        assert not self.outbox, "a send was left unposted at the end"
        for sch in self.front.schedulers:
            sch.blocks.check()
        events, first = trace.gather(), runtime.rank() == 0
        return {
            "records": list(self.records.values()),
            "events": events if first else None,
            "cache_waits": [sch.cache_waits for sch in self.front.schedulers] if first else None,
            "free_blocks": [len(sch.blocks.free) for sch in self.front.schedulers] if first else None,
        }

    def exchange(self, mine):
        """Post last tick's sends with this tick's receives, in one batch: the hidden states of `mine`
        from the previous stage, and (stage 0) the tokens of the step issued p ticks ago."""
        p, recvs, act = self.p, [], None
        back = self.history[p][self.me] if p > 1 and len(self.history) > p and self.runner.first else None
        going_on = [w for w in back.works if not w.last] if back else []
        if not self.runner.first and mine:
            act = torch.empty(mine.num_tokens, self.cfg.hidden, device=self.dev)
            recvs.append((act, self.peer[self.s - 1]))
        if going_on:
            tokens = torch.empty(len(going_on), dtype=torch.long, device=self.dev)
            recvs.append((tokens, self.peer[p - 1]))
        if self.outbox or recvs:
            for h in comm.batch_p2p(self.outbox, recvs, group="pp"):
                h.wait()
        self.outbox = []
        if going_on:
            self.fed.update(zip((w.seq for w in going_on), tokens.tolist()))
        return act

    def compute(self, mine, act) -> None:
        """Embed (stage 0), this stage's blocks, argmax (last stage); queue the sends."""
        run, prefills = self.runner, sum(w.prefill for w in mine.works)
        with trace.span(
            "prefill" if prefills else "decode",
            tokens=mine.num_tokens,
            seqs=len(mine.works),
            prefills=prefills,
            tick=mine.tick,
            replica=self.me,
        ):
            if run.first:
                ids = [
                    t
                    for w in mine.works
                    for t in (self.by_id[w.seq].prompt if w.prefill else (self.fed[w.seq],))
                ]
                x = run.embed(mine, ids)
            else:
                x = act if mine else torch.zeros(0, self.cfg.hidden, device=self.dev)  # ep lockstep, no work
            x = run.forward(mine, x)
            tokens = run.sample(mine, x) if run.last and mine else []
        if not run.last and mine:
            self.outbox.append((x, self.peer[self.s + 1]))
        if tokens:
            self.emit(mine, tokens, runtime.wall() - self.t0)
            going_on = [(w.seq, tok) for w, tok in zip(mine.works, tokens) if not w.last]
            if self.p == 1:
                self.fed.update(going_on)
            elif going_on:
                self.outbox.append(
                    (torch.tensor([tok for _, tok in going_on], device=self.dev), self.peer[0])
                )

    def emit(self, step, tokens, t) -> None:
        if not self.recorder:
            return
        for w, tok in zip(step.works, tokens):
            if w.seq not in self.records:
                r = self.by_id[w.seq]
                self.records[w.seq] = Record(r.id, list(r.prompt), r.arrival, replica=self.me)
            self.records[w.seq].tokens.append(tok)
            self.records[w.seq].times.append(t)


def serve_rank(cfg: GPTConfig, sc: ServeConfig, requests: list[Request], progress: bool = False) -> dict:
    """One rank's part of `serve` (what `launch` runs on every rank)."""
    return RankLoop(cfg, sc, requests, progress).run()


def check_requests(cfg: GPTConfig, requests: list[Request], p: Problems) -> Request | None:
    """Problems of the requests themselves; returns the longest (prompt + new tokens), if any."""
    if not requests:
        p.add("requests: give at least one Request")
        return None
    if min(len(r.prompt) for r in requests) < 1 or min(r.max_new_tokens for r in requests) < 1:
        p.add("every request needs a prompt of >= 1 token and max_new_tokens >= 1")
        return None
    if len({r.id for r in requests}) < len(requests):
        p.add("request ids must be unique")
    bad = [r.id for r in requests if any(not 0 <= t < cfg.vocab for t in r.prompt)]
    if bad:
        p.add(f"requests {bad[:5]} hold token ids outside the vocabulary 0..{cfg.vocab - 1}")
    return max(requests, key=lambda r: len(r.prompt) + r.max_new_tokens)


def serve(
    cfg: GPTConfig, requests: list[Request], sc: ServeConfig = ServeConfig(), progress: bool = False
) -> ServeResult:
    """Validate, then serve `requests` greedily with the layout of `sc` on sc.world_size ranks
    (local processes, or the torchrun processes). Raises ConfigError listing every problem."""
    p = Problems()
    for a in ("tp", "pp", "ep", "dp", "max_batch", "block_size"):
        p.integer(a, getattr(sc, a), low=1)
    if sc.num_blocks is not None:
        p.integer("num_blocks", sc.num_blocks, low=1)
    longest = check_requests(cfg, requests, p)
    check_serve(
        cfg,
        sc,
        len(longest.prompt) if longest else None,
        len(longest.prompt) + longest.max_new_tokens if longest else None,
        p,
    )
    p.raise_if_any("this serving configuration cannot run")
    t = time.time()
    out = launch(
        serve_rank,
        sc.world_size,
        cfg,
        sc,
        requests,
        progress,
        timeout=sc.timeout,
        progress_timeout=sc.timeout,
    )
    records = sorted((r for o in out for r in o["records"]), key=lambda r: r.id)
    return ServeResult(
        records, out[0]["events"], sc, out[0]["cache_waits"], out[0]["free_blocks"], time.time() - t
    )
