"""`python -m minipar.train`: train the reference GPT with any mix of dp, pp, tp(+sp), cp, ep
and ZeRO 0-3 on local CPU ranks (started here) or under torchrun (NCCL on GPUs).

It prints the loss, tokens/s and per-rank peak memory (and MFU on GPUs), writes the merged
Chrome trace and a timeline PNG of the last step, and by default checks the loss curve
against the single-device reference. Examples:

    python -m minipar.train                                   # dp2 x pp2 x tp2 on 8 CPU ranks
    python -m minipar.train --dp 4 --pp 1 --tp 1 --zero 1
    python -m minipar.train --dp 2 --pp 1 --tp 2 --sp --zero 3      # FSDP + TP (torchtitan's 2D)
    python -m minipar.train --dp 2 --pp 2 --tp 2 --zero 3 --microbatches 4   # FSDP + TP + PP (its 3D)
    python -m minipar.train --dp 2 --pp 1 --tp 2 --ep 2 --experts 4
    python -m minipar.train --save ckpt --save-every 10 --steps 20
    python -m minipar.train --resume ckpt --tp 4 --pp 1       # resume under another layout
    torchrun --standalone --nproc_per_node 8 -m minipar.train
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import checkpoint, comm, runtime, trace
from .compose import Optimizer, ParallelConfig, build_stages, check, loss_of
from .mesh import Mesh
from .model import GPTConfig, SyntheticData, train_reference

__all__ = ["main", "parse_args", "configs", "train_rank"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minipar.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("layout (their product is the number of ranks)")
    g.add_argument("--dp", type=int, default=2, help="data-parallel replicas [2]")
    g.add_argument("--pp", type=int, default=2, help="pipeline stages [2]")
    g.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks, innermost [2]")
    g.add_argument("--cp", type=int, default=1, help="context-parallel ranks (sequence split) [1]")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (needs --experts) [1]")
    s = p.add_argument_group("strategies")
    s.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3),
                   help="ZeRO stage over dp: 0 all-reduce, 1 optimizer state, 2 + gradients, 3 + parameters "
                        "(FSDP; with pp, 2 and 3 need gpipe, 1f1b or interleaved_1f1b) [1]")
    s.add_argument("--sp", action="store_true", help="sequence parallelism inside the tp group")
    s.add_argument("--schedule", default="1f1b", help="pipeline schedule: gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zbv, dualpipe, "
                                                 "dualpipev [1f1b]")
    s.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (gradient accumulation) [4]")
    s.add_argument("--chunks", type=int, default=1, help="model chunks per pipeline rank, v (interleaved, zbv) [1]")
    s.add_argument("--cp-method", default="ring", choices=("ring", "ulysses"), help="context-parallel attention [ring]")
    s.add_argument("--cp-layout", default="zigzag", choices=("zigzag", "contiguous"), help="ring's sequence split [zigzag]")
    s.add_argument("--recompute", default=None, choices=("full", "selective"), help="activation recompute per block")
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="compute precision; masters stay fp32 [fp32]")
    m = p.add_argument_group("model and data (the same in every layout)")
    m.add_argument("--layers", type=int, default=4, help="transformer blocks [4]")
    m.add_argument("--hidden", type=int, default=64, help="model width h [64]")
    m.add_argument("--heads", type=int, default=4, help="attention heads a [4]")
    m.add_argument("--seq", type=int, default=32, help="sequence length s [32]")
    m.add_argument("--vocab", type=int, default=64, help="vocabulary V [64]")
    m.add_argument("--batch", type=int, default=16, help="global batch in sequences [16]")
    m.add_argument("--experts", type=int, default=0, help="experts per MoE block; 0 = dense [0]")
    m.add_argument("--top-k", type=int, default=2, help="experts per token [2]")
    m.add_argument("--seed", type=int, default=0, help="seed of weights and data [0]")
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=int, default=20, help="optimizer steps in all [20]")
    r.add_argument("--out", default="runs/latest", help="trace.json and timeline.png go here [runs/latest]")
    r.add_argument("--metrics", default=None, help="write one JSON line per step here")
    r.add_argument("--save", default=None, help="checkpoint directory")
    r.add_argument("--save-every", type=int, default=0, help="save every N steps (with --save)")
    r.add_argument("--resume", default=None, help="resume from this checkpoint directory (any layout)")
    r.add_argument("--resume-step", type=int, default=None, help="the step to resume from [the newest]")
    r.add_argument("--no-check", action="store_true", help="skip the single-device comparison")
    r.add_argument("--timeout", type=float, default=120, help="seconds any collective may wait [120]")
    return p.parse_args(argv)


def configs(a) -> tuple[GPTConfig, ParallelConfig]:
    """The model and parallel configs of the arguments; raises ValueError listing every problem."""
    groups = a.dp * a.ep * a.microbatches if a.experts else 1
    cfg = GPTConfig(vocab=a.vocab, seq=a.seq, layers=a.layers, heads=a.heads, hidden=a.hidden,
                    experts=a.experts, top_k=min(a.top_k, max(a.experts, 1)), moe_groups=groups)
    pc = ParallelConfig(dp=a.dp, pp=a.pp, tp=a.tp, cp=a.cp, ep=a.ep, zero=a.zero, sp=a.sp, schedule=a.schedule,
                        microbatches=a.microbatches, chunks=a.chunks, cp_method=a.cp_method,
                        cp_layout=a.cp_layout, recompute=a.recompute, precision=a.precision)
    check(cfg, pc, a.batch)
    return cfg, pc


def _local_slice(full: torch.Tensor, p: torch.Tensor, pc: ParallelConfig) -> torch.Tensor:
    d = getattr(p, "tp_dim", None)
    return full if d is None else full.chunk(pc.tp, dim=d)[comm.local_rank("tp")]


def _piece(p: torch.Tensor, pc: ParallelConfig) -> checkpoint.Piece:
    d = getattr(p, "tp_dim", None)
    if d is None:
        return checkpoint.Piece(tuple(p.shape))
    full = tuple(s * pc.tp if i == d else s for i, s in enumerate(p.shape))
    return checkpoint.box_piece(full, d, comm.local_rank("tp"), pc.tp)


def save(directory, step, cfg, pc, mesh, named, opt, seed) -> None:
    """Every rank writes its TP slices (dp/cp replicas skip: another rank holds the same)."""
    moments, values = opt.moments(), opt.values()  # collectives under ZeRO
    shards = {}
    if mesh.index("dp") == 0 and mesh.index("cp") == 0:
        for n, p in named:
            shards[f"param/{n}"] = (values[n], _piece(p, pc))
            if n in moments:
                shards[f"exp_avg/{n}"] = (moments[n][0], _piece(p, pc))
                shards[f"exp_avg_sq/{n}"] = (moments[n][1], _piece(p, pc))
    with trace.enabled(False):
        checkpoint.save(directory, step, shards, meta={"config": cfg.to_dict(), "seed": seed}, layout=pc.to_dict())


def train_rank(cfg: GPTConfig, pc: ParallelConfig, a) -> dict:
    """One rank's training loop (runs inside `launch` or under torchrun)."""
    from tqdm.std import tqdm
    torch.manual_seed(a.seed)
    mesh = Mesh(**pc.axes())
    dev = runtime.device()
    schedule = None
    if pc.pp > 1:
        from .pp import build_schedule
        schedule = build_schedule(pc.schedule, pc.pp, pc.microbatches, pc.chunks)
    state, start = None, 0
    if a.resume:
        ck = checkpoint.load(a.resume, a.resume_step)
        ck.check_meta(config=cfg.to_dict())
        start = ck.step
        state = {k.split("/", 1)[1]: ck.full(k) for k in ck.keys() if k.startswith("param/")}
    stages = {s: st.to(dev) for s, st in build_stages(cfg, pc, mesh, a.seed, state, schedule).items()}
    named = [(n, p) for st in stages.values() for n, p in st.named_parameters()]
    opt = Optimizer(named, pc, module=stages if pc.zero >= 2 else None)
    if a.resume:
        opt.load_moments({n: tuple(_local_slice(ck.full(f"{k}/{n}"), p, pc) for k in ("exp_avg", "exp_avg_sq"))
                          for n, p in named}, start)
    data = SyntheticData(cfg.vocab, cfg.seq, a.seed)
    shards, shard = pc.dp * pc.ep, mesh.index("dp") * pc.ep + mesh.index("ep")
    m, runner = pc.microbatches, None
    last_stage = schedule is None or any(s == schedule.num_stages - 1 for s in stages)
    if schedule is not None:
        from .pp import validate
        from .pp.runtime import StepRunner
        coords = mesh.coords()
        seq_local = cfg.seq // pc.cp // (pc.tp if pc.sp else 1)
        runner = StepRunner(schedule, validate(schedule)[mesh.index("pp")], stages,
                            lambda mb: (a.batch // shards // m, seq_local, cfg.hidden),
                            rank=mesh.index("pp"), peer=lambda r: mesh.rank_of(**{**coords, "pp": r}),
                            loss=lambda logits, y: loss_of(logits, y, pc), group="pp")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=pc.precision == "bf16")
    losses, times, peaks = [], [], []
    for step in tqdm(range(start, a.steps), disable=runtime.rank() != 0, desc=_describe(pc), file=sys.stdout):
        t0 = time.perf_counter()
        with trace.enabled(step == a.steps - 1):  # the timeline shows the last step
            x, y = (t.chunk(shards)[shard] for t in data.batch(step, a.batch))
            if pc.cp > 1:
                from .cp import local_batch
                x, y, _ = local_batch(x, y, mesh.index("cp"), pc.cp, pc.seq_layout)
            xs, ys = [t.to(dev) for t in x.chunk(m)], [t.to(dev) for t in y.chunk(m)]
            opt.zero_grad()
            with autocast:
                aux = 0.0
                if runner is not None:
                    local = runner.run(xs, ys)
                    aux = runner.aux_sum   # MoE stages' load-balancing losses, on every stage
                else:
                    local, stage = 0.0, stages[0]
                    for mb, (xm, ym) in enumerate(zip(xs, ys)):
                        with trace.span(f"F{mb}"):
                            loss = loss_of(stage(xm), ym, pc) + stage.aux_loss()
                        with trace.span(f"B{mb}"):
                            (loss / m).backward()
                        local += loss.item() / m
            with trace.span("opt"):
                opt.step()
        mine = (local if last_stage else 0.0) + aux
        counted = mesh.index("tp") == 0   # one copy of each data shard's loss
        book = torch.tensor([mine if counted else 0.0, _peak_mb()], dtype=torch.float64)
        with trace.enabled(False):
            total = comm.all_reduce(book[:1].clone()).item() / (shards * pc.cp)
            peak = comm.all_gather(book[1:].clone())
        losses.append(total)
        peaks.append(peak.tolist())
        times.append(time.perf_counter() - t0)
        if a.save and a.save_every and (step + 1) % a.save_every == 0:
            save(a.save, step + 1, cfg, pc, mesh, named, opt, a.seed)
    return {"losses": losses, "times": times, "peaks": peaks, "start": start, "events": trace.gather(),
            "state_bytes": opt.state_bytes(), "coords": mesh.coords()}


def _describe(pc: ParallelConfig) -> str:
    return " x ".join(f"{k}{v}" for k, v in pc.axes().items() if v > 1) or "1 rank"


def _peak_mb() -> float:
    if torch.cuda.is_available() and runtime.device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg, pc = configs(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    t = time.time()
    res = runtime.launch(train_rank, pc.world_size, cfg, pc, a, timeout=a.timeout)
    wall = time.time() - t
    if runtime.is_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # every torchrun process gets the results; rank 0 reports
    r0 = res[0]
    report(a, cfg, pc, r0, wall)
    if not a.no_check:
        ref = train_reference(cfg, steps=a.steps, batch_size=a.batch, seed=a.seed)
        err = max(abs(x - y) for x, y in zip(ref.losses[r0["start"]:], r0["losses"]))
        print(f"single-device reference: max |loss difference| over steps {r0['start'] + 1}-{a.steps} = {err:.2e}")
        if err > (1e-4 if pc.precision == "fp32" else 5e-2):
            print("MISMATCH against the single-device reference", file=sys.stderr)
            return 1
    return 0


def report(a, cfg: GPTConfig, pc: ParallelConfig, r0: dict, wall: float) -> None:
    tokens = a.batch * cfg.seq
    step_time = sorted(r0["times"])[len(r0["times"]) // 2]
    print(f"\nminipar.train: GPT {cfg.layers}x{cfg.hidden} on {pc.world_size} ranks ({_describe(pc)}, "
          f"zero={pc.zero}{', sp' if pc.sp else ''}{', ' + pc.schedule if pc.pp > 1 else ''}), "
          f"{len(r0['losses'])} steps in {wall:.1f}s")
    print(f"loss {r0['losses'][0]:.4f} -> {r0['losses'][-1]:.4f}; median step {step_time * 1e3:.1f} ms, "
          f"{tokens / step_time:,.0f} tokens/s; peak memory per rank (MB): "
          f"{[round(x) for x in r0['peaks'][-1]]}")
    if runtime.device().type == "cuda":
        from .plan import mfu, model_flops
        from .plan.hardware import get_gpu
        from .plan import GPUS
        name = torch.cuda.get_device_name().lower()   # e.g. "nvidia h100 80gb hbm3"
        known = [k for k in GPUS if k in name]
        if known:
            f = model_flops(cfg.layers, cfg.hidden, cfg.vocab, cfg.seq, a.batch)
            peak = get_gpu(known[0]).peak_flops
            print(f"MFU {mfu(f, step_time, pc.world_size, peak):.1%} (Megatron-LM model FLOPs over the "
                  f"{known[0]}'s bf16 dense peak)")
        else:
            print(f"MFU: {name!r} is not in minipar.plan.hardware (add it with plan.add_gpu)")
    if a.metrics:
        with open(a.metrics, "w") as f:
            for i, (l, dt, pk) in enumerate(zip(r0["losses"], r0["times"], r0["peaks"])):
                f.write(json.dumps({"step": r0["start"] + i + 1, "loss": l, "tokens_per_s": tokens / dt,
                                    "peak_mem_mb": pk}) + "\n")
    evs = r0["events"]
    os.makedirs(a.out, exist_ok=True)
    print("\ncommunication in the last step, rank 0 (logical payload bytes):")
    print(trace.format_summary([e for e in evs if e.rank == 0]))
    trace.to_chrome_trace(evs, os.path.join(a.out, "trace.json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .timeline import plot_timeline
    ax = plot_timeline(evs, title=f"last step, {_describe(pc)} (wall clock, {pc.world_size} ranks on this machine)")
    png = os.path.join(a.out, "timeline.png")
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=110)
    plt.close(ax.figure)
    print(f"\nwrote {png} and {os.path.join(a.out, 'trace.json')} (open it in https://ui.perfetto.dev)")


if __name__ == "__main__":
    sys.exit(main())
