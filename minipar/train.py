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
    python -m minipar.train --layers 6 --pp 4 --tp 1 --dp 2 --stage-layers 1,2,2,1
    python -m minipar.train --save ckpt --save-every 10 --steps 20
    python -m minipar.train --resume ckpt --tp 4 --pp 1       # resume under another layout
    python -m minipar.train --save ckpt --save-every 2 --max-restarts 1 --inject-fault 1:5
    torchrun --standalone --nproc_per_node 8 --max-restarts 3 -m minipar.train --save ckpt --resume auto

Never losing a run: with --save, the last completed step is always saved (at the end, and
when SIGINT/SIGTERM stops the run: exit code 130/143). --max-restarts K restarts a run whose
rank died (an exception, a kill, or no progress within --timeout) from its newest checkpoint.
Every bad flag is refused before any rank starts, one line per problem, with exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import matplotlib
import torch
from tqdm.std import tqdm

from . import checkpoint, comm, config, runtime, trace
from .compose import Optimizer, ParallelConfig, build_stages, loss_of, mirror_group
from .config import RunConfig, validate
from .cp import local_batch
from .mesh import Mesh
from .model import GPTConfig, SyntheticData, train_reference
from .plan import GPUS, get_gpu, mfu, model_flops
from .pp import build_schedule
from .pp import validate as validate_schedule
from .pp.runtime import StepRunner
from .result import TrainResult
from .timeline import plot_timeline
from .validation import exit_on_error

__all__ = ["main", "parse_args", "configs", "validate", "RunConfig", "train_rank", "save"]

configs = validate  # the name notebooks and tests know


def parse_args(argv=None):
    return config.parse_args(argv, description=__doc__)


EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it


# ----------------------------------------------------------------------------- checkpoints
def _local_slice(full: torch.Tensor, p: torch.Tensor, pc: ParallelConfig) -> torch.Tensor:
    d = getattr(p, "tp_dim", None)
    return full if d is None else full.chunk(pc.tp, dim=d)[comm.local_rank("tp")]


def _piece(p: torch.Tensor, pc: ParallelConfig) -> checkpoint.Piece:
    d = getattr(p, "tp_dim", None)
    if d is None:
        return checkpoint.Piece(tuple(p.shape))
    full = tuple(s * pc.tp if i == d else s for i, s in enumerate(p.shape))
    return checkpoint.box_piece(full, d, comm.local_rank("tp"), pc.tp)


def save(directory, step, cfg, pc, mesh, named, opt, seed, losses=()) -> None:
    """Every rank writes its TP slices (dp/cp replicas skip: another rank holds the same).
    The loss curve so far travels in the metadata, so a resumed run reports the whole curve."""
    moments, values = opt.moments(), opt.values()  # collectives under ZeRO
    shards = {}
    if mesh.index("dp") == 0 and mesh.index("cp") == 0:
        for n, p in named:
            shards[f"param/{n}"] = (values[n], _piece(p, pc))
            if n in moments:
                shards[f"exp_avg/{n}"] = (moments[n][0], _piece(p, pc))
                shards[f"exp_avg_sq/{n}"] = (moments[n][1], _piece(p, pc))
    with trace.enabled(False):
        checkpoint.save(
            directory,
            step,
            shards,
            meta={"config": cfg.to_dict(), "seed": seed, "losses": list(losses)},
            layout=pc.to_dict(),
        )


# ----------------------------------------------------------------------------- one rank
def train_rank(
    cfg: GPTConfig, pc: ParallelConfig, run: RunConfig, attempt: int = 0, resume_from: str | None = None
) -> TrainResult:
    """One rank's training loop (inside `launch` or under torchrun). `resume_from`: a checkpoint
    directory (its newest step, or run.resume_step); `attempt` counts restarts (faults are
    injected on attempt 0 only)."""
    torch.manual_seed(run.seed)
    mesh = Mesh(**pc.axes())
    dev = runtime.device()
    schedule = (
        build_schedule(pc.schedule, pc.pp, pc.microbatches, pc.chunks) if pc.pp > 1 or pc.chunks > 1 else None
    )
    state, start, history = None, 0, []
    if resume_from:
        ck = checkpoint.load(resume_from, run.resume_step if attempt == 0 else None)
        ck.check_meta(config=cfg.to_dict())
        start, history = ck.step, list(ck.meta.get("losses", []))[: ck.step]
        state = {k.split("/", 1)[1]: ck.full(k) for k in ck.keys() if k.startswith("param/")}
    stages = {s: st.to(dev) for s, st in build_stages(cfg, pc, mesh, run.seed, state, schedule).items()}
    named = [(n, p) for st in stages.values() for n, p in st.named_parameters()]
    if run.compile:  # each block on its own: the pipeline and ZeRO hooks stay outside the graphs
        for st in stages.values():
            for blk in st.blocks.values():
                blk.compile()
    opt = Optimizer(
        named,
        pc,
        module=stages,
        kind=run.optimizer,
        **({"fused": True} if run.fused else {}),
        mirror=mirror_group(mesh, pc.pp) if pc.schedule == "dualpipe" and schedule else None,
    )
    if resume_from and run.optimizer == "adamw":
        opt.load_moments(
            {
                n: tuple(_local_slice(ck.full(f"{k}/{n}"), p, pc) for k in ("exp_avg", "exp_avg_sq"))
                for n, p in named
            },
            start,
        )
        del ck, state
    data = SyntheticData(cfg.vocab, cfg.seq, run.seed)
    shards, shard = pc.dp * pc.ep, mesh.index("dp") * pc.ep + mesh.index("ep")
    m, runner = pc.microbatches, None
    # a rank computes losses if it holds the last stage of some micro-batch's path (DualPipe: two)
    last_stage = schedule is None or any(s == path[-1] for path in schedule.paths for s in stages)
    if schedule is not None:
        coords = mesh.coords()
        seq_local = cfg.seq // pc.cp // (pc.tp if pc.sp else 1)
        runner = StepRunner(
            schedule,
            validate_schedule(schedule)[mesh.index("pp")],
            stages,
            lambda mb: (run.batch // shards // m, seq_local, cfg.hidden),
            rank=mesh.index("pp"),
            peer=lambda r: mesh.rank_of(**{**coords, "pp": r}),
            loss=lambda logits, y: loss_of(logits, y, pc),
            group="pp",
        )
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=pc.precision == "bf16")
    losses, times, peaks, stopped, saved, first_grads = list(history), [], [], 0, None, {}
    metrics = open(run.metrics, "a") if run.metrics and runtime.rank() == 0 else None
    for step in tqdm(
        range(start, run.steps), disable=runtime.rank() != 0, desc=_describe(pc), file=sys.stdout
    ):
        if run.inject_fault == (runtime.rank(), step + 1) and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # the fault a test asked for: this rank dies here
        t0 = time.perf_counter()
        with trace.enabled(step == run.steps - 1):  # the timeline shows the last step
            x, y = (t.chunk(shards)[shard] for t in data.batch(step, run.batch))
            if pc.cp > 1:
                x, y, _ = local_batch(x, y, mesh.index("cp"), pc.cp, pc.seq_layout)
            xs, ys = [t.to(dev) for t in x.chunk(m)], [t.to(dev) for t in y.chunk(m)]
            opt.zero_grad()
            with autocast:
                aux = 0.0
                if runner is not None:
                    local = runner.run(xs, ys)
                    aux = runner.aux_sum  # MoE stages' load-balancing losses, on every stage
                else:
                    local, stage = 0.0, stages[0]
                    for mb, (xm, ym) in enumerate(zip(xs, ys)):
                        with trace.span(f"F{mb}"):
                            ce = loss_of(stage(xm), ym, pc)
                            aux_mb = stage.aux_loss()
                        with trace.span(f"B{mb}"):
                            ((ce + aux_mb) / m).backward()
                        local += ce.item() / m
                        aux += aux_mb.item() / m
            with trace.span("opt"):
                opt.step()
        if run.capture and step == start:
            with trace.enabled(False):
                first_grads = full_tensors(opt.gradients(), named, mesh)
        # One copy of each data shard's loss: the cross-entropy of tp rank 0 (every tp rank holds it),
        # and the MoE aux loss of tp rank 0, or of every tp rank under SP (each holds a share).
        tp0 = mesh.index("tp") == 0
        mine = (local if last_stage and tp0 else 0.0) + (aux if tp0 or pc.sp else 0.0)
        book = torch.tensor([mine, runtime.stop_requested()], dtype=torch.float64)
        with trace.enabled(False):
            total = comm.all_reduce(book[:1].clone()).item() / (shards * pc.cp)
            stop = int(
                comm.all_reduce(book[1:].clone(), op="max").item()
            )  # every rank stops at the same step
            peak = comm.all_gather(torch.tensor([_peak_mb()], dtype=torch.float64))
        losses.append(total)
        peaks.append(peak.tolist())
        times.append(time.perf_counter() - t0)
        runtime.heartbeat()
        if metrics is not None:
            metrics.write(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": total,
                        "tokens_per_s": run.batch * cfg.seq / times[-1],
                        "step_time_s": times[-1],
                        "peak_mem_mb": peaks[-1],
                        "attempt": attempt,
                    }
                )
                + "\n"
            )
            metrics.flush()
        last = step + 1 == run.steps
        if run.save and (last or stop or (run.save_every and (step + 1) % run.save_every == 0)):
            save(run.save, step + 1, cfg, pc, mesh, named, opt, run.seed, losses)
            saved = step + 1
        if stop and not last:
            stopped = stop
            break
    if metrics is not None:
        metrics.close()
    with trace.enabled(False):
        params = full_tensors(opt.values(), named, mesh) if run.capture else {}
    return TrainResult(
        losses,
        first_grads=first_grads,
        params=params,
        extra=dict(
            times=times,
            peaks=peaks,
            start=start,
            events=trace.gather(),
            state_bytes=opt.state_bytes(),
            coords=mesh.coords(),
            stopped=stopped,
            saved=saved,
        ),
    )


def full_tensors(local: dict, named, mesh: Mesh) -> dict:
    """{name: tensor gathered to the reference's full shape} (gradients or parameters, TP slices
    gathered), on the ranks that hold one copy of it (dp, cp and tp index 0). For parity tests."""
    out = {}
    for n, p in named:
        g = local[n].detach()
        if getattr(p, "tp_dim", None) is not None:
            g = comm.all_gather(g.contiguous(), dim=p.tp_dim, group="tp")
        if mesh.index("dp") == 0 and mesh.index("cp") == 0 and mesh.index("tp") == 0:
            out[n] = g.detach().cpu().clone()
    return out


def _describe(pc: ParallelConfig) -> str:
    return " x ".join(f"{k}{v}" for k, v in pc.axes().items() if v > 1) or "1 rank"


def _peak_mb() -> float:
    if runtime.device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_peak_mb()


def _rss_peak_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:  # VmHWM: the process's peak resident memory
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- the command
def _newest(directory: str | None) -> str | None:
    """`directory` if it holds a complete checkpoint, else None (start fresh)."""
    return directory if directory and checkpoint.has_checkpoint(directory) else None


def _record(run: RunConfig, event: dict) -> None:
    if run.metrics:
        with open(run.metrics, "a") as f:
            f.write(json.dumps(event) + "\n")


@exit_on_error
def main(argv=None) -> int:
    a = parse_args(argv)
    cfg, pc, run = validate(a)
    os.makedirs(run.out, exist_ok=True)
    if run.save:
        os.makedirs(run.save, exist_ok=True)
    resume = _newest(run.save) if run.resume == "auto" else run.resume
    if run.metrics:
        os.makedirs(os.path.dirname(os.path.abspath(run.metrics)), exist_ok=True)
        if not resume and (not runtime.is_torchrun() or os.environ["RANK"] == "0"):
            open(run.metrics, "w").close()  # a fresh run starts a fresh file; a resumed one appends
    if a.sp and a.tp == 1:
        print("note: --sp has no effect with --tp 1 (Megatron-LM turns it off likewise)")
    attempt, t = 0, time.time()
    while True:
        try:
            res = runtime.launch(
                train_rank,
                pc.world_size,
                cfg,
                pc,
                run,
                attempt,
                resume,
                timeout=run.timeout,
                progress_timeout=run.timeout,
                grace=run.timeout,
            )
            break
        except runtime.RankError as e:
            reason = _one_line(e)
            if attempt >= run.max_restarts:
                print(f"\nerror: {reason}\n{e.remote_traceback}", file=sys.stderr)
                return 1
            attempt += 1
            resume = _newest(run.save)
            step = checkpoint.read_metadata(resume)["step"] if resume else 0
            print(
                f"\nrestart {attempt} of {run.max_restarts}: {reason}; resuming from "
                + (f"step {step} ({resume})" if resume else "the start (no checkpoint)"),
                flush=True,
            )
            _record(run, {"event": "restart", "attempt": attempt, "reason": reason, "resume_step": step})
        except KeyboardInterrupt:
            print("\ninterrupted: the ranks did not stop in time and were killed", file=sys.stderr)
            return 130
    wall = time.time() - t
    if runtime.is_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # every torchrun process gets the results; rank 0 reports
    r0 = res[0]
    report(run, cfg, pc, r0, wall, attempt)
    if r0["stopped"]:
        sig = signal.Signals(r0["stopped"])
        print(
            f"stopped by {sig.name} after step {r0['start'] + len(r0['times'])}"
            + (f"; saved it to {run.save}" if r0["saved"] else " (no --save: nothing kept)")
        )
        return EXIT_SIGNAL.get(sig, 128 + sig)
    if run.check:
        ref = train_reference(cfg, steps=run.steps, batch_size=run.batch, seed=run.seed)
        err = max(abs(x - y) for x, y in zip(ref.losses, r0["losses"]))
        print(f"single-device reference: max |loss difference| over steps 1-{run.steps} = {err:.2e}")
        if err > (1e-4 if pc.precision == "fp32" else 5e-2):
            print("MISMATCH against the single-device reference", file=sys.stderr)
            return 1
    return 0


def _one_line(e: runtime.RankError) -> str:
    last = [ln for ln in str(e.remote_traceback).strip().splitlines() if ln.strip()]
    return f"rank {e.rank}: " + (last[-1].strip() if last else "failed")


def report(
    run: RunConfig, cfg: GPTConfig, pc: ParallelConfig, r0: dict, wall: float, restarts: int = 0
) -> None:
    if not r0["times"]:
        return
    tokens = run.batch * cfg.seq
    step_time = sorted(r0["times"])[len(r0["times"]) // 2]
    print(
        f"\nminipar.train: GPT {cfg.layers}x{cfg.hidden} on {pc.world_size} ranks ({_describe(pc)}, "
        f"zero={pc.zero}{', sp' if pc.sp else ''}{', ' + pc.schedule if pc.pp > 1 else ''}), "
        f"{len(r0['losses'])} steps in {wall:.1f}s" + (f" with {restarts} restart(s)" if restarts else "")
    )
    print(
        f"loss {r0['losses'][0]:.4f} -> {r0['losses'][-1]:.4f}; median step {step_time * 1e3:.1f} ms, "
        f"{tokens / step_time:,.0f} tokens/s; peak memory per rank (MB): "
        f"{[round(x) for x in r0['peaks'][-1]]}"
    )
    if runtime.device().type == "cuda":
        print(gpu_utilization(cfg, pc, run, step_time))
    evs = r0["events"]
    print("\ncommunication in the last step, rank 0 (logical payload bytes):")
    print(trace.format_summary([e for e in evs if e.rank == 0]))
    trace.to_chrome_trace(evs, os.path.join(run.out, "trace.json"))
    matplotlib.use("Agg")
    ax = plot_timeline(
        evs, title=f"last step, {_describe(pc)} (wall clock, {pc.world_size} ranks on this machine)"
    )
    png = os.path.join(run.out, "timeline.png")
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=110)
    matplotlib.pyplot.close(ax.figure)
    print(f"\nwrote {png} and {os.path.join(run.out, 'trace.json')} (open it in https://ui.perfetto.dev)")


def gpu_utilization(cfg, pc, run, step_time) -> str:
    """MFU on a GPU: Megatron-LM's model FLOPs (Narayanan et al. 2021, eq. 3) over the bf16 peak."""
    name = torch.cuda.get_device_name().lower()  # e.g. "nvidia h100 80gb hbm3"
    known = [k for k in GPUS if k in name]
    if not known:
        return f"MFU: {name!r} is not in minipar.plan.hardware (add it with plan.add_gpu)"
    f = model_flops(cfg.layers, cfg.hidden, cfg.vocab, cfg.seq, run.batch)
    return (
        f"MFU {mfu(f, step_time, pc.world_size, get_gpu(known[0]).peak_flops):.1%} (Megatron-LM model "
        f"FLOPs over the {known[0]}'s bf16 dense peak)"
    )


if __name__ == "__main__":
    sys.exit(main())
