"""Our pipeline executor against torch.distributed.pipelining, on the same stages and gloo ranks.

    python -m minipar.bench.pp [--ranks 4] [--microbatches 8] [--steps 6] [--rounds 2]

For each schedule both implement, both train the same stage-partitioned GPT for a few
steps; prints the median step time of ours / torch's, the peak RSS per rank, and
checks that the losses agree. Timing on a shared CPU box is noisy: read the ratio, not
the milliseconds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys

from torch.distributed import pipelining

from .. import launch, runtime
from ..model import GPT, GPTConfig, SyntheticData, make_optimizer
from ..pp import build_schedule
from ..pp.runtime import loss_fn, train_pipeline
from ..pp.stage import build_stages
from ..validation import ArgumentParser, Int, Problems, exit_on_error

# ours -> torch.distributed.pipelining class (zb_h1 is torch's interleaved ZB with one stage per rank)
PEERS = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zb_h1": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


def torch_pipeline(name: str, cfg: GPTConfig, steps: int, batch_size: int, m: int, seed: int = 0) -> dict:
    """Run on every rank: torch's schedule `PEERS[name]` over our stages (same weights, same data)."""
    sch = build_schedule(name, runtime.world_size(), m, 2 if name == "interleaved_1f1b" else 1)
    rank = runtime.rank()
    stages = {s: st.to(runtime.device()) for s, st in build_stages(GPT(cfg, seed), sch, rank).items()}
    pstages = [
        pipelining.PipelineStage(st, s, sch.num_stages, runtime.device()) for s, st in sorted(stages.items())
    ]
    cls = getattr(pipelining, PEERS[name])
    pipe = cls(
        pstages if len(pstages) > 1 or cls.__name__ not in ("ScheduleGPipe", "Schedule1F1B") else pstages[0],
        n_microbatches=m,
        loss_fn=loss_fn,
    )
    opt = make_optimizer([p for st in stages.values() for p in st.parameters()])
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    losses, times = [], []
    first, last = 0 in stages, sch.num_stages - 1 in stages
    for step in range(steps):
        t0 = runtime.wall()
        x, y = data.batch(step, batch_size)
        opt.zero_grad(set_to_none=True)
        out = []
        args = (x.to(runtime.device()),) if first else ()
        kw = {"target": y.to(runtime.device()), "losses": out} if last else {}
        pipe.step(*args, **kw)
        losses.append(sum(l.item() for l in out) / m if last else 0.0)
        grads = {
            n: p.grad.clone()
            for st in stages.values()
            for n, p in st.named_parameters()
            if p.grad is not None
        }
        opt.step()
        times.append(runtime.wall() - t0)
    return {"losses": losses, "grads": grads, "times": times}


def _both(names, cfg, steps, batch_size, m, rounds):
    """Alternate ours and torch's for `rounds` rounds (swapping who goes first), so drift in the
    machine's load hits both alike; pool the step times, leaving out each run's first (warm-up) step."""
    out = {}
    run = {
        "ours": lambda sch: train_pipeline(sch, cfg, steps, batch_size),
        "torch": lambda sch: torch_pipeline(sch.name, cfg, steps, batch_size, m),
    }
    for name in names:
        sch = build_schedule(name, runtime.world_size(), m, 2 if name == "interleaved_1f1b" else 1)
        out[name], times = {}, {k: [] for k in run}
        for i in range(rounds):
            for k in ("ours", "torch") if i % 2 == 0 else ("torch", "ours"):
                r = run[k](sch)
                out[name].setdefault(k, r)  # losses and gradients of the first run
                times[k] += r["times"][1:]
        for k in run:
            out[name][k]["times"] = times[k]
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def compare(names=tuple(PEERS), ranks=4, m=8, steps=6, cfg=None, batch_size=16, rounds=2) -> dict:
    cfg = cfg or GPTConfig(vocab=64, seq=32, layers=8, heads=4, hidden=64)
    res = launch(_both, ranks, list(names), cfg, steps, batch_size, m, rounds, timeout=600)
    rows = {}
    for name in names:
        ours = [sum(r[name]["ours"]["losses"][i] for r in res) for i in range(steps)]
        theirs = [sum(r[name]["torch"]["losses"][i] for r in res) for i in range(steps)]
        n = len(res[0][name]["ours"]["times"])
        med = lambda key: statistics.median(max(r[name][key]["times"][i] for r in res) for i in range(n))
        rows[name] = {
            "ratio": med("ours") / med("torch"),
            "ours_ms": 1e3 * med("ours"),
            "torch_ms": 1e3 * med("torch"),
            "loss_diff": max(abs(a - b) for a, b in zip(ours, theirs)),
        }
    rows["peak_rss_mb"] = max(r["rss_mb"] for r in res)
    return rows


@exit_on_error
def main(argv=None):
    ap = ArgumentParser(
        prog="python -m minipar.bench.pp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--ranks", type=Int, default=4, help="pipeline ranks [4]")
    ap.add_argument("--microbatches", type=Int, default=8, help="micro-batches per step [8]")
    ap.add_argument(
        "--steps", type=Int, default=6, help="steps per run; the first is left out as warm-up [6]"
    )
    ap.add_argument("--rounds", type=Int, default=2, help="runs of each, alternating which goes first [2]")
    a = ap.parse_args(argv)
    p = Problems(cli=True)
    ok = (
        p.integer("ranks", a.ranks, low=2, why="a pipeline needs two stages")
        & p.integer("microbatches", a.microbatches, low=1)
        & p.integer("rounds", a.rounds, low=1)
    )
    p.integer("steps", a.steps, low=2, why="the first step is a warm-up")
    if ok:
        p.divides(
            "microbatches",
            a.microbatches,
            "batch",
            16,
            "the benchmark's 16 sequences split into micro-batches",
        )
        for name in PEERS:  # every schedule the comparison runs must exist for this p and m
            try:
                build_schedule(name, a.ranks, a.microbatches, 2 if name == "interleaved_1f1b" else 1)
            except ValueError as e:
                p.add(f"{name}: {e}")
    p.raise_if_any()
    rows = compare(ranks=a.ranks, m=a.microbatches, steps=a.steps, rounds=a.rounds)
    print(f"{'schedule':<18}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}{'max |loss diff|':>17}")
    for name, r in rows.items():
        if name == "peak_rss_mb":
            continue
        print(
            f"{name:<18}{r['ours_ms']:>10.1f}{r['torch_ms']:>10.1f}{r['ratio']:>8.2f}{r['loss_diff']:>17.2e}"
        )
        assert r["loss_diff"] < 1e-5, f"{name}: losses disagree by {r['loss_diff']:.2e}"
    print(f"peak RSS per rank (both runs): {rows['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    rc = main()  # 2 for a refused command line; the results otherwise
    sys.exit(rc if isinstance(rc, int) else 0)
