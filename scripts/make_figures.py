"""Regenerate every figure under figures/ (the README shows them).

    python scripts/make_figures.py                    # all
    python scripts/make_figures.py ring_allreduce     # by name; names: see FIGURES (--list)

Each figure is a small function below that runs minipar on simulated CPU ranks (or the
simulator) and saves one PNG; all use the package's one timeline renderer and colours.
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import minipar  # noqa: E402
from minipar import runtime, trace  # noqa: E402
from minipar.timeline import plot_timeline  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(HERE, "figures")
FIGURES = {}


def figure(name):
    def reg(fn):
        FIGURES[name] = fn
        return fn

    return reg


def _save(fig, name):
    path = os.path.join(OUT, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


def _ring(numel):
    from minipar.collectives import ring_all_reduce

    ring_all_reduce(torch.randn(numel))
    return trace.gather()


@figure("ring_allreduce")
def ring_allreduce():
    evs = minipar.launch(_ring, 4, 1 << 16)[0]
    ax = plot_timeline(evs, title="ring all-reduce of 256 KiB on 4 CPU ranks (wall clock): 2(N-1) exchanges")
    _save(ax.figure, "ring_allreduce")


@figure("main_job")
def main_job():
    from minipar.train import main

    out = os.path.join(HERE, "runs", "figures")
    main(["--steps", "5", "--out", out, "--no-check"])
    import shutil

    shutil.copy(os.path.join(out, "timeline.png"), os.path.join(OUT, "main_job_timeline.png"))


# ----------------------------------------------------------------------------- memory
def _memory_ladder(cfg, n):
    """Run on every rank: model-state bytes of DDP (bf16 + fp32 masters), ZeRO-1/2/3, ZeRO-3 + offload."""
    from minipar.dp import DDP, held_bytes, local_batch
    from minipar.model import GPT, SyntheticData
    from minipar.offload import ShardOptimizer
    from minipar.precision import MixedPrecision
    from minipar.zero import train_zero

    model = GPT(cfg).to(torch.bfloat16)
    ddp, data = DDP(model), SyntheticData(cfg.vocab, cfg.seq)
    opt = ShardOptimizer([p.detach() for p in model.parameters()])
    for step in range(2):  # measure before the second step: Adam's moments exist
        ddp.zero_grad()
        ddp(*local_batch(data, step, 8))[1].backward()
        mem = dict(
            params=held_bytes(model.parameters()),
            grads=held_bytes(b.buffer for b in ddp.buckets),
            **opt.state_bytes(),
        )
        opt.step([p.grad for p in model.parameters()])
    out = {"DDP": (mem, sum(p.numel() for p in model.parameters()), 0)}
    for name, kw in (
        ("ZeRO-1", dict(stage=1)),
        ("ZeRO-2", dict(stage=2)),
        ("ZeRO-3", dict(stage=3)),
        ("ZeRO-3\n+ offload", dict(stage=3, offload=True)),
    ):
        r = train_zero(cfg, steps=2, batch_size=8, precision=MixedPrecision("bf16"), **kw)
        out[name] = (r["memory"], r["padded_params"], kw["stage"])
    return out


@figure("memory_ladder")
def memory_ladder():
    from minipar.model import GPTConfig
    from minipar.plan import model_state_bytes
    from minipar.timeline import COLORS

    cfg, n = GPTConfig(vocab=64, seq=64, layers=2, heads=4, hidden=64), 4
    rungs = minipar.launch(_memory_ladder, n, cfg, n)[0]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for i, (name, (m, psi, stage)) in enumerate(rungs.items()):
        host = m.get("where") == "host"
        bottom = 0
        for part, c in (("params", COLORS["F"]), ("grads", COLORS["B"]), ("optimizer", COLORS["opt"])):
            ax.bar(
                i,
                m[part] / 1024,
                bottom=bottom,
                color=c,
                hatch="//" if host and part == "optimizer" else None,
                label=part if i == 0 else None,
            )
            bottom += m[part] / 1024
        formula = model_state_bytes(psi, n, stage)
        assert m["params"] + m["grads"] + m["optimizer"] == formula, name
        ax.plot(
            [i - 0.4, i + 0.4],
            [formula / 1024] * 2,
            color="black",
            lw=2,
            label="ZeRO formula (2+2+12)Ψ" if i == 0 else None,
        )
    ax.set_xticks(range(len(rungs)), list(rungs))
    ax.set_ylabel("KiB per rank")
    ax.set_title(f"model states per rank (measured), Ψ = {psi:,}, N = {n}, bf16 + fp32 Adam; hatched: host")
    ax.legend(fontsize=8)
    _save(fig, "memory_ladder")


# ----------------------------------------------------------------------------- tensor / sequence parallel
def _tp_sp_layer(cfg, b):
    from minipar import Mesh, sp

    Mesh(tp=runtime.world_size())
    return {
        name: sp.measure_layer(cfg, b, sequence_parallel=flag)
        for name, flag in (("TP", False), ("TP + SP", True))
    }


@figure("tp_sp_comm")
def tp_sp_comm():
    from minipar.model import GPTConfig
    from minipar.timeline import COLORS

    cfg, b, t = GPTConfig(vocab=64, seq=32, layers=1, heads=4, hidden=64), 2, 2
    res = minipar.launch(_tp_sp_layer, t, cfg, b)[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
    names, labelled = list(res), set()
    for i, name in enumerate(names):
        bottom = 0
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            c, nbytes = res[name]["comm"].get(op, (0, 0))
            if nbytes:
                a1.bar(
                    i, nbytes / 1024, bottom=bottom, color=COLORS[op], label=None if op in labelled else op
                )
                labelled.add(op)
            bottom += nbytes / 1024
    a1.set_xticks(range(len(names)), names)
    a1.set_ylabel("KiB per rank per layer (payload)")
    a1.set_title("communication, forward + backward")
    a1.legend(fontsize=8)
    a2.bar(names, [res[n]["activation_bytes"] / 1024 for n in names], color=[COLORS["F"], COLORS["B"]])
    a2.set_ylabel("KiB saved for backward")
    a2.set_title("activation memory per layer")
    fig.suptitle(
        f"one transformer layer on t = {t} ranks: s = {cfg.seq}, b = {b}, h = {cfg.hidden}, fp32 (measured)"
    )
    _save(fig, "tp_sp_comm")


# ----------------------------------------------------------------------------- context parallel
@figure("cp_balance")
def cp_balance():
    from minipar import cp
    from minipar.timeline import COLORS

    CP, heads, seq, dim = 4, 4, 256, 16
    fig, ax = plt.subplots(figsize=(6.5, 3))
    for j, (layout, c) in enumerate((("contiguous", COLORS["all_reduce"]), ("zigzag", COLORS["B"]))):
        work = [cp.ring_flops(1, heads, seq, dim, CP, r, layout) / 1e6 for r in range(CP)]
        ax.bar([r + (j - 0.5) * 0.4 for r in range(CP)], work, width=0.4, color=c, label=layout)
    ax.set_xticks(range(CP), [f"rank {r}" for r in range(CP)])
    ax.set_ylabel("attention MFLOP (forward)")
    ax.set_title(f"causal ring attention, cp = {CP}, s = {seq}: work per rank")
    ax.legend(fontsize=8)
    _save(fig, "cp_balance")


# ----------------------------------------------------------------------------- MoE
@figure("moe_balance")
def moe_balance():
    from minipar import ep as EP
    from minipar.model import GPTConfig
    from minipar.timeline import COLORS

    cfg = GPTConfig(
        vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2, router="sigmoid", aux_alpha=0.0
    )
    runs = {
        "no balancing": EP.train_moe(cfg, steps=80, batch_size=16, skew=1.0),
        "aux loss α=0.1": EP.train_moe(cfg.replace(aux_alpha=0.1), steps=80, batch_size=16, skew=1.0),
        "aux-loss-free γ=0.01": EP.train_moe(cfg, steps=80, batch_size=16, gamma=0.01, skew=1.0),
    }
    fig, ax = plt.subplots(figsize=(7, 3))
    for (name, r), c in zip(runs.items(), (COLORS["all_reduce"], COLORS["F"], COLORS["B"])):
        ax.plot(r.imbalance(10), color=c, lw=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("MoE load balancing from a skewed start, 4 experts, top-2 (10-step window)")
    ax.legend(fontsize=8)
    _save(fig, "moe_balance")


# ----------------------------------------------------------------------------- pipeline
@figure("pipeline_schedules")
def pipeline_schedules():
    from minipar.pp import build_schedule, simulate

    specs = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1)]
    fig, axes = plt.subplots(len(specs), 1, figsize=(10, 1.5 * len(specs) + 0.6), sharex=True)
    longest = 0.0
    for ax, (name, v) in zip(axes, specs):
        r = simulate(build_schedule(name, 4, 8, v), 1.0, 2.0)
        longest = max(longest, r.makespan)
        plot_timeline(
            r.events(),
            ax=ax,
            title=f"{name}: p = 4, m = 8, makespan {r.makespan:g} "
            f"(t_f = 1, t_b = 2), bubble {r.bubble_fraction:.0%}",
            unit="units",
            clock="modeled",
            label=False,
        )
    for ax in axes:  # shared axis: fit the slowest schedule
        ax.set_xlim(0, longest * 1.01)
    _save(fig, "pipeline_schedules")


# ----------------------------------------------------------------------------- planner
@figure("planner")
def planner():
    from minipar import plan
    from minipar.timeline import COLORS

    p = plan.plan("70b", gpus=64, gpu="h100")
    cands = p.ranked + p.more
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.scatter(
        [e.memory_per_gpu / 1e9 for e in cands],
        [e.mfu * 100 for e in cands],
        s=10,
        color=COLORS["opt"],
        label=f"{len(cands)} layouts that fit",
    )
    b = p.best
    c = b.config
    ax.scatter(
        [b.memory_per_gpu / 1e9],
        [b.mfu * 100],
        s=60,
        color=COLORS["all_reduce"],
        zorder=3,
        label=f"best: tp={c['tp']} pp={c['pp']} dp={c['dp']} ZeRO-{c['zero_stage']} {c['schedule']}",
    )
    ax.set_xlabel("memory per GPU (GB)")
    ax.set_ylabel("predicted MFU (%)")
    ax.set_title("planner: Llama-2-70B on 64 x H100, every layout that fits")
    ax.legend(fontsize=8)
    _save(fig, "planner")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] == ["--list"]:
        sys.exit(print("\n".join(FIGURES)))
    names = sys.argv[1:] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    for n in names:
        FIGURES[n]()
