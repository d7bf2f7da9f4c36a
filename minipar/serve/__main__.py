"""`python -m minipar.serve`: serve a stream of requests with continuous batching and a paged
KV cache on any mix of tp, pp, ep and dp, on local CPU ranks or under torchrun.

It prints throughput and TTFT / inter-token latency percentiles measured on this machine's
wall clock, checks every request's tokens against single-device `GPT.generate`, writes one
JSON line per request (--out) and, beside it, the ranks' timeline (PNG) and a Chrome trace.
Modeled GPU numbers come from `python -m minipar.plan.serving`. Examples:

    python -m minipar.serve                                     # tp2 x pp2 on 4 CPU ranks
    python -m minipar.serve --tp 4 --pp 1 --requests 32 --arrival-rate 20
    python -m minipar.serve --tp 1 --pp 1 --ep 2 --experts 4    # MoE: attention DP, experts EP
    python -m minipar.serve --tp 1 --pp 1 --dp 2 --num-blocks 6 # a small cache: admission waits
    torchrun --standalone --nproc_per_node 4 -m minipar.serve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt

from .. import runtime, trace
from ..model import GPT, GPTConfig
from ..timeline import plot_timeline
from ..validation import ArgumentParser, Float, Int, Invalid, Problems, exit_on_error
from .engine import ServeConfig, check_serve, serve, sizes_ok
from .workload import format_summary, make_requests, parse_range, reference

__all__ = ["main", "parse_args", "configure"]


def Range(text: str):
    """argparse type: N or LO:HI (inclusive), or Invalid (never raises)."""
    try:
        return parse_range(text)
    except ValueError:
        return Invalid(text, "a whole number or a range LO:HI")


def parse_args(argv=None):
    p = ArgumentParser(
        prog="python -m minipar.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("layout (their product is the number of ranks)")
    g.add_argument("--tp", type=Int, default=2, help="tensor-parallel ranks per stage, innermost [2]")
    g.add_argument("--pp", type=Int, default=2, help="pipeline stages [2]")
    g.add_argument(
        "--ep",
        type=Int,
        default=1,
        help="expert-parallel ranks (attention data-parallel; needs --experts) [1]",
    )
    g.add_argument("--dp", type=Int, default=1, help="data-parallel replicas behind the router [1]")
    m = p.add_argument_group("model (the same in every layout; weights from --seed)")
    m.add_argument("--layers", type=Int, default=4, help="transformer blocks [4]")
    m.add_argument("--hidden", type=Int, default=64, help="model width h [64]")
    m.add_argument("--heads", type=Int, default=4, help="attention heads a [4]")
    m.add_argument("--seq", type=Int, default=64, help="positions: prompt + new tokens must fit [64]")
    m.add_argument("--vocab", type=Int, default=64, help="vocabulary V [64]")
    m.add_argument("--experts", type=Int, default=0, help="experts per MoE block, dropless; 0 = dense [0]")
    m.add_argument("--top-k", type=Int, default=2, help="experts per token [2]")
    w = p.add_argument_group("workload and engine")
    w.add_argument("--requests", type=Int, default=16, help="requests to serve [16]")
    w.add_argument("--prompt-len", type=Range, default=(4, 12), help="prompt tokens: N or LO:HI [4:12]")
    w.add_argument(
        "--max-new-tokens", type=Range, default=(4, 12), help="tokens to generate: N or LO:HI [4:12]"
    )
    w.add_argument(
        "--arrival-rate",
        type=Float,
        default=None,
        help="requests per second, Poisson (seeded); omit for all at once",
    )
    w.add_argument(
        "--max-batch", type=Int, default=8, help="sequences per step (per micro-batch under pp) [8]"
    )
    w.add_argument("--block-size", type=Int, default=4, help="token slots per KV-cache block [4]")
    w.add_argument(
        "--num-blocks",
        type=Int,
        default=None,
        help="KV-cache blocks per replica [enough for --max-batch longest requests per micro-batch]",
    )
    w.add_argument("--seed", type=Int, default=0, help="seed of the weights, prompts and arrivals [0]")
    w.add_argument(
        "--out",
        default="runs/serve/requests.jsonl",
        help="one JSON line per request; FILE.timeline.png and FILE.trace.json beside it "
        "[runs/serve/requests.jsonl]",
    )
    return p.parse_args(argv)


def configure(a) -> tuple[GPTConfig, ServeConfig, list]:
    """The model, engine config and requests of the arguments; raises ConfigError listing every problem."""
    p = Problems(cli=True)
    for f in (
        "tp",
        "pp",
        "ep",
        "dp",
        "layers",
        "hidden",
        "heads",
        "requests",
        "max_batch",
        "block_size",
        "top_k",
    ):
        p.integer(f, getattr(a, f), low=1)
    p.integer("seq", a.seq, low=2)
    p.integer("vocab", a.vocab, low=2)
    p.integer("experts", a.experts, low=0)
    p.integer("seed", a.seed, low=0)
    if a.num_blocks is not None:
        p.integer("num_blocks", a.num_blocks, low=1)
    if a.arrival_rate is not None:
        p.number("arrival_rate", a.arrival_rate, low=0, low_open=True, why="omit it for all requests at once")
    ranges_ok = True
    for f in ("prompt_len", "max_new_tokens"):
        v = getattr(a, f)
        if isinstance(v, Invalid):
            p.add(f"{p.show(f, v.text)} must be {v.kind}, e.g. 8 or 4:12")
            ranges_ok = False
        elif v[0] < 1 or v[1] < v[0]:
            p.add(f"{p.show(f, f'{v[0]}:{v[1]}')} needs 1 <= LO <= HI")
            ranges_ok = False
    p.output_file("out", a.out)
    if sizes_ok(a.hidden, a.heads) and a.hidden % a.heads:
        p.add(f"{p.show('hidden', a.hidden)} must be divisible by {p.name('heads')}={a.heads}")
    sc = ServeConfig(
        tp=a.tp,
        pp=a.pp,
        ep=a.ep,
        dp=a.dp,
        max_batch=a.max_batch,
        block_size=a.block_size,
        num_blocks=a.num_blocks,
        seed=a.seed,
    )
    shape = SimpleNamespace(
        heads=a.heads, vocab=a.vocab, layers=a.layers, experts=a.experts, top_k=a.top_k, seq=a.seq
    )
    lengths = (a.prompt_len[1], a.prompt_len[1] + a.max_new_tokens[1]) if ranges_ok else (None, None)
    check_serve(shape, sc, *lengths, p)
    p.raise_if_any("this serving run cannot start")
    cfg = GPTConfig.from_flags(a)
    return cfg, sc, make_requests(a.requests, a.vocab, a.prompt_len, a.max_new_tokens, a.arrival_rate, a.seed)


@exit_on_error
def main(argv=None) -> int:
    a = parse_args(argv)
    cfg, sc, requests = configure(a)
    res = serve(cfg, requests, sc, progress=True)
    if runtime.is_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # every torchrun process gets the results; rank 0 reports
    return report(a, cfg, sc, requests, res)


def report(a, cfg, sc, requests, res) -> int:
    s = res.summary()
    print(
        f"\nminipar.serve: GPT {cfg.layers}x{cfg.hidden}{f', {cfg.experts} experts' if cfg.experts else ''} on "
        f"{sc.world_size} ranks ({sc.describe()}), {len(requests)} requests, continuous batching "
        f"(max batch {sc.max_batch}), paged KV cache of {sc.blocks(max(r.cache_tokens for r in requests))} blocks "
        f"x {sc.block_size} tokens per replica; {res.wall:.1f} s"
    )
    print(f"wall clock on this machine: {format_summary(s)}")
    if any(res.cache_waits):
        print(
            f"admission waited for free cache blocks in {sum(res.cache_waits)} steps "
            f"(per replica: {res.cache_waits})"
        )
    model = GPT(cfg, sc.seed)
    refs = [reference(model, r) for r in requests]
    same = sum(rec.tokens == tok for rec, (tok, _) in zip(res.records, refs))
    print(f"tokens equal single-device GPT.generate's for {same}/{len(requests)} requests")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        for rec in res.records:
            f.write(json.dumps(rec.to_json()) + "\n")
    stem = a.out[: -len(".jsonl")] if a.out.endswith(".jsonl") else a.out
    trace.to_chrome_trace(res.events, stem + ".trace.json")
    _plot(res.events, sc, stem + ".timeline.png")
    print(f"wrote {a.out}, {stem}.timeline.png and {stem}.trace.json (open it in https://ui.perfetto.dev)")
    # a near-tie (best and second-best logits within fp32 rounding) may legitimately flip a token
    flipped = [rec.id for rec, (tok, margin) in zip(res.records, refs) if rec.tokens != tok and margin > 1e-4]
    if flipped:
        print(f"MISMATCH against GPT.generate for requests {flipped}", file=sys.stderr)
        return 1
    return 0


def _plot(events, sc, path) -> None:
    matplotlib.use("Agg")  # a file, never a window
    ax = plot_timeline(
        events, title=f"serving, {sc.describe()} (wall clock, {sc.world_size} ranks on this machine)"
    )
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)


if __name__ == "__main__":
    sys.exit(main())
