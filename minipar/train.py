"""`python -m minipar.train`: the main job, a short parallel training run on local CPU ranks
(or under torchrun) that prints a summary and writes a timeline figure and a Chrome trace.

Data parallelism here is the plain textbook form (average every gradient with one
all-reduce after backward), checked against the single-device reference loop at the
end of the run. The strategy modules (dp, zero, tp, pp, cp, moe) plug in as they land.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import comm, runtime, trace
from .model import GPT, GPTConfig, SyntheticData, make_optimizer, train_reference

__all__ = ["main", "parse_args", "run"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipar.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, default=4, help="data-parallel ranks (the world size) [4]")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps [20]")
    p.add_argument("--batch", type=int, default=16, help="global batch size in sequences [16]")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks [2]")
    p.add_argument("--hidden", type=int, default=64, help="model width h [64]")
    p.add_argument("--heads", type=int, default=4, help="attention heads a [4]")
    p.add_argument("--seq", type=int, default=32, help="sequence length s [32]")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary size V [64]")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data [0]")
    p.add_argument("--out", default="runs/latest", help="where the trace, figure and metrics go [runs/latest]")
    p.add_argument("--metrics", default=None, help="write one JSON line per step to this path")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the single-device loop")
    a = p.parse_args(argv)
    problems = []
    if a.dp < 1:
        problems.append(f"--dp {a.dp}: need at least 1 rank")
    if a.dp >= 1 and a.batch % a.dp:
        problems.append(f"--batch {a.batch} is not divisible by --dp {a.dp}: use a multiple of {a.dp}")
    if a.hidden % a.heads:
        problems.append(f"--hidden {a.hidden} is not divisible by --heads {a.heads}")
    if problems:
        p.error("; ".join(problems))
    return a


def _cfg(a) -> GPTConfig:
    return GPTConfig(vocab=a.vocab, seq=a.seq, layers=a.layers, heads=a.heads, hidden=a.hidden)


def run(a) -> dict:
    """One rank's training loop; returns its losses, timings and events."""
    from tqdm.auto import tqdm
    cfg, r, n = _cfg(a), runtime.rank(), runtime.world_size()
    model = GPT(cfg, a.seed).to(runtime.device())
    opt = make_optimizer(model.parameters())
    data = SyntheticData(cfg.vocab, cfg.seq, a.seed)
    b = a.batch // n
    losses, times = [], []
    for step in tqdm(range(a.steps), disable=r != 0, desc=f"dp={n}"):
        trace.reset() if step == a.steps - 1 else None  # keep the last step's timeline
        t0 = time.perf_counter()
        x, y = (t[r * b:(r + 1) * b].to(runtime.device()) for t in data.batch(step, a.batch))
        opt.zero_grad(set_to_none=True)
        with trace.span("F"):
            _, loss = model(x, y)
        with trace.span("B"):
            loss.backward()
        for p in model.parameters():  # the data-parallel average: one all-reduce per gradient
            comm.all_reduce(p.grad, op="avg", group=None)
        with trace.span("opt"):
            opt.step()
        mean_loss = comm.all_reduce(loss.detach().clone(), op="avg").item()
        losses.append(mean_loss)
        times.append(time.perf_counter() - t0)
    return {"losses": losses, "times": times, "events": trace.gather(), "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t = time.time()
    res = runtime.launch(run, a.dp, a)
    wall = time.time() - t
    if runtime.is_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # under torchrun every process gets the results; rank 0 reports
    r0 = res[0]
    tokens = a.batch * a.seq
    step_time = sorted(r0["times"])[len(r0["times"]) // 2]
    print(f"\nminipar.train: GPT {a.layers}x{a.hidden}, {a.dp} data-parallel CPU ranks, {a.steps} steps in {wall:.1f}s")
    print(f"loss {r0['losses'][0]:.4f} -> {r0['losses'][-1]:.4f}; median step {step_time * 1e3:.1f} ms, "
          f"{tokens / step_time:,.0f} tokens/s; peak RSS per rank {max(x['peak_rss_mb'] for x in res):.0f} MB")
    if a.metrics:
        with open(a.metrics, "w") as f:
            for s, (l, dt) in enumerate(zip(r0["losses"], r0["times"])):
                f.write(json.dumps({"step": s, "loss": l, "tokens_per_s": tokens / dt,
                                    "peak_mem_mb": [x["peak_rss_mb"] for x in res]}) + "\n")
    evs = r0["events"]
    print("\ncommunication in the last step (bytes are logical payload per rank):")
    print(trace.format_summary([e for e in evs if e.rank == 0]))
    trace.to_chrome_trace(evs, os.path.join(a.out, "trace.json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .timeline import plot_timeline
    ax = plot_timeline(evs, title=f"last training step, dp={a.dp} (wall clock, {a.dp} ranks on this machine)")
    png = os.path.join(a.out, "timeline.png")
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=110)
    plt.close(ax.figure)
    print(f"\nwrote {png} and {os.path.join(a.out, 'trace.json')} (open it in https://ui.perfetto.dev)")
    if not a.no_check:
        ref = train_reference(_cfg(a), steps=a.steps, batch_size=a.batch, seed=a.seed)
        err = max(abs(x - y) for x, y in zip(ref.losses, r0["losses"]))
        print(f"single-device reference: max |loss difference| over {a.steps} steps = {err:.2e}")
        if err > 1e-4:
            print("MISMATCH against the single-device reference", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
