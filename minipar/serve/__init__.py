"""Serving: continuous batching over a paged KV cache, on the same ranks, mesh and tracer as training.

    from minipar.serve import ServeConfig, make_requests, serve
    reqs = make_requests(16, vocab=64, prompt_len="4:12", max_new_tokens="4:12", arrival_rate=50, seed=0)
    res = serve(GPTConfig(...), reqs, ServeConfig(tp=2, pp=2))     # or: python -m minipar.serve
    res.records[0].tokens == GPT(cfg, 0).generate(prompt, n)[0, len(prompt):]  (greedy, fp32)

Pieces, vLLM-shaped (one file each):
    blocks.py     BlockManager: fixed-size blocks, a block table per sequence, a free-block allocator
    scheduler.py  Scheduler (Orca's iteration-level batching; pp micro-batches), Router (dp), Frontend
    runner.py     StageRunner: this rank's stage (tp/pp/ep), packed prefill + decode, paged attention
    engine.py     the lockstep serving loop on every rank; `serve()` validates and launches it
    workload.py   seeded requests with Poisson arrivals; TTFT/ITL/throughput; the modeled-clock twin
"""

from .blocks import BlockManager, blocks_for, slots_of
from .engine import RankLoop, ServeConfig, ServeResult, check_requests, check_serve, serve, serve_rank
from .runner import StageRunner, paged_attention
from .scheduler import POLICIES, Frontend, Request, Router, Scheduler, Step, Work
from .workload import (
    Record,
    Simulated,
    format_summary,
    make_requests,
    parse_range,
    reference,
    simulate,
    summarize,
)

__all__ = [
    "BlockManager",
    "blocks_for",
    "slots_of",
    "ServeConfig",
    "ServeResult",
    "check_serve",
    "check_requests",
    "serve",
    "serve_rank",
    "RankLoop",
    "StageRunner",
    "paged_attention",
    "POLICIES",
    "Frontend",
    "Request",
    "Router",
    "Scheduler",
    "Step",
    "Work",
    "Record",
    "Simulated",
    "format_summary",
    "make_requests",
    "parse_range",
    "reference",
    "simulate",
    "summarize",
]
