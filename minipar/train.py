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

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
import torch
from tqdm.std import tqdm

from . import checkpoint, comm, runtime, trace
from .compose import TRAIN_SCHEDULES, Optimizer, ParallelConfig, build_stages, check, loss_of, mirror_group
from .cp import local_batch
from .mesh import Mesh
from .model import GPTConfig, SyntheticData, train_reference
from .pp import build_schedule, validate as validate_schedule
from .plan import GPUS, get_gpu, mfu, model_flops
from .pp.runtime import StepRunner
from .timeline import plot_timeline
from .validation import ArgumentParser, Float, Int, Invalid, Problems, exit_on_error, free_memory_bytes

__all__ = ["main", "parse_args", "configs", "validate", "RunConfig", "train_rank", "save"]

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + the signal, as a shell reports it


def _ints(text: str):
    """argparse type for '3,4,4,3' (or Invalid)."""
    vals = [Int(x) for x in text.split(",")]
    return Invalid(text, "comma-separated whole numbers") if any(isinstance(v, Invalid) for v in vals) else tuple(vals)


def _fault(text: str):
    """argparse type for RANK:STEP (or Invalid)."""
    parts = text.split(":")
    vals = [Int(x) for x in parts]
    if len(parts) != 2 or any(isinstance(v, Invalid) for v in vals):
        return Invalid(text, "RANK:STEP")
    return tuple(vals)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m minipar.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("layout (their product is the number of ranks)")
    g.add_argument("--dp", type=Int, default=2, help="data-parallel replicas [2]")
    g.add_argument("--pp", type=Int, default=2, help="pipeline stages [2]")
    g.add_argument("--tp", type=Int, default=2, help="tensor-parallel ranks, innermost [2]")
    g.add_argument("--cp", type=Int, default=1, help="context-parallel ranks (sequence split) [1]")
    g.add_argument("--ep", type=Int, default=1, help="expert-parallel ranks (needs --experts) [1]")
    s = p.add_argument_group("strategies")
    s.add_argument("--zero", type=Int, default=1, help="ZeRO stage over dp: 0 all-reduce, 1 optimizer state, "
                   "2 + gradients, 3 + parameters (FSDP; with pp, 2 and 3 need gpipe, 1f1b or interleaved_1f1b) [1]")
    s.add_argument("--sp", action="store_true", help="sequence parallelism inside the tp group (no effect at tp 1)")
    s.add_argument("--schedule", default="1f1b", help=f"pipeline schedule: {', '.join(TRAIN_SCHEDULES)} [1f1b]")
    s.add_argument("--microbatches", type=Int, default=4, help="micro-batches per step (gradient accumulation) [4]")
    s.add_argument("--chunks", type=Int, default=1, help="model chunks per pipeline rank, v (interleaved) [1]")
    s.add_argument("--stage-layers", type=_ints, default=None,
                   help="blocks per model part, e.g. 3,4,4,3 (pp*chunks numbers) [balanced: equal, or fewer on "
                        "the first and last stages, which hold the embedding and the head]")
    s.add_argument("--cp-method", default="ring", help="context-parallel attention: ring, ulysses [ring]")
    s.add_argument("--cp-layout", default="zigzag", help="ring's sequence split: zigzag, contiguous [zigzag]")
    s.add_argument("--recompute", default=None, help="activation recompute per block: full, selective [none]")
    s.add_argument("--precision", default="fp32", help="compute precision: fp32, bf16; masters stay fp32 [fp32]")
    m = p.add_argument_group("model and data (the same in every layout)")
    m.add_argument("--layers", type=Int, default=4, help="transformer blocks [4]")
    m.add_argument("--hidden", type=Int, default=64, help="model width h [64]")
    m.add_argument("--heads", type=Int, default=4, help="attention heads a [4]")
    m.add_argument("--seq", type=Int, default=32, help="sequence length s [32]")
    m.add_argument("--vocab", type=Int, default=64, help="vocabulary V [64]")
    m.add_argument("--batch", type=Int, default=16, help="global batch in sequences [16]")
    m.add_argument("--experts", type=Int, default=0, help="experts per MoE block; 0 = dense [0]")
    m.add_argument("--top-k", type=Int, default=2, help="experts per token (with --experts) [2]")
    m.add_argument("--seed", type=Int, default=0, help="seed of weights and data [0]")
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=Int, default=20, help="optimizer steps in all [20]")
    r.add_argument("--out", default="runs/latest", help="trace.json and timeline.png go here [runs/latest]")
    r.add_argument("--metrics", default=None, help="append one JSON line per step (and per restart) to this file")
    r.add_argument("--save", default=None, help="checkpoint directory; the last completed step is always saved")
    r.add_argument("--save-every", type=Int, default=0, help="also save every N steps (with --save) [0: only the last]")
    r.add_argument("--resume", default=None, help="resume from this checkpoint directory (any layout), or 'auto': "
                                                  "the newest in --save's directory, else start fresh")
    r.add_argument("--resume-step", type=Int, default=None, help="the step to resume from [the newest]")
    r.add_argument("--max-restarts", type=Int, default=0, help="restart a run whose rank died, from its newest "
                                                               "checkpoint, at most this many times [0]")
    r.add_argument("--inject-fault", type=_fault, default=None, metavar="RANK:STEP",
                   help="SIGKILL rank RANK when it reaches step STEP, on the first attempt only (for tests)")
    r.add_argument("--no-check", action="store_true", help="skip the single-device comparison")
    r.add_argument("--timeout", type=Float, default=120, help="seconds any collective may wait, and a step may "
                                                              "take, before the run counts as hung [120]")
    return p.parse_args(argv)


@dataclass(frozen=True)
class RunConfig:
    """What a run does besides the model and the layout; built and checked once by `validate`."""
    steps: int = 20
    batch: int = 16
    seed: int = 0
    out: str = "runs/latest"
    metrics: str | None = None
    save: str | None = None
    save_every: int = 0
    resume: str | None = None          # a checkpoint directory, or "auto" (--save's, if it has one)
    resume_step: int | None = None
    max_restarts: int = 0
    inject_fault: tuple | None = None  # (rank, step)
    check: bool = True
    timeout: float = 120.0


def validate(a) -> tuple[GPTConfig, ParallelConfig, RunConfig]:
    """Every flag and every rule between flags, before any rank starts: a ConfigError whose
    lines are the problems, each saying how to fix it. The rules of each strategy live in its
    module (`compose.check` calls them all); the ones here are about the run itself."""
    p = Problems(cli=True)
    for f in ("dp", "pp", "tp", "cp", "ep", "microbatches", "chunks", "layers", "hidden", "heads", "seq", "vocab",
              "batch", "steps"):
        p.integer(f, getattr(a, f), low=1)
    p.integer("experts", a.experts, low=0)
    p.integer("top_k", a.top_k, low=1)
    p.integer("seed", a.seed, low=0, high=2**31 - 1, why="it seeds torch.Generator")
    p.integer("save_every", a.save_every, low=0)
    p.integer("max_restarts", a.max_restarts, low=0)
    p.number("timeout", a.timeout, low=0, low_open=True, why="seconds a collective may wait")
    p.choice("zero", a.zero, (0, 1, 2, 3))
    p.choice("schedule", a.schedule, TRAIN_SCHEDULES)
    p.choice("cp_method", a.cp_method, ("ring", "ulysses"))
    p.choice("cp_layout", a.cp_layout, ("zigzag", "contiguous"))
    p.choice("recompute", a.recompute, (None, "full", "selective"))
    p.choice("precision", a.precision, ("fp32", "bf16"))
    for f, kind in (("stage_layers", "comma-separated layer counts such as 3,4,4,3"), ("inject_fault", "RANK:STEP"),
                    ("resume_step", "a step number")):
        v = getattr(a, f)
        if isinstance(v, Invalid) or (f == "resume_step" and v is not None and not p.integer(f, v, low=1)):
            if isinstance(v, Invalid):
                p.add(f"{p.show(f, v.text)} must be {kind}")
    _paths(a, p)
    if p:   # the rules between flags need sane sizes first
        p.raise_if_any()
    if a.experts:
        p.integer("top_k", a.top_k, high=a.experts, why="each token picks top-k distinct experts")
    p.divides("heads", a.heads, "hidden", a.hidden, "each attention head is hidden/heads wide")
    if p:
        p.raise_if_any()
    cfg = GPTConfig(vocab=a.vocab, seq=a.seq, layers=a.layers, heads=a.heads, hidden=a.hidden, experts=a.experts,
                    top_k=min(a.top_k, max(a.experts, 1)),
                    moe_groups=a.dp * a.ep * a.microbatches if a.experts else 1)
    pc = ParallelConfig(dp=a.dp, pp=a.pp, tp=a.tp, cp=a.cp, ep=a.ep, zero=a.zero, sp=a.sp and a.tp > 1,
                        schedule=a.schedule, microbatches=a.microbatches, chunks=a.chunks, cp_method=a.cp_method,
                        cp_layout=a.cp_layout, recompute=a.recompute, precision=a.precision,
                        stage_layers=a.stage_layers)
    check(cfg, pc, a.batch, problems=p)
    run = RunConfig(steps=a.steps, batch=a.batch, seed=a.seed, out=a.out, metrics=a.metrics, save=a.save,
                    save_every=a.save_every, resume=a.resume, resume_step=a.resume_step, max_restarts=a.max_restarts,
                    inject_fault=a.inject_fault, check=not a.no_check, timeout=float(a.timeout))
    _run_rules(cfg, pc, run, p)
    _memory(cfg, pc, run, p)
    p.raise_if_any()
    return cfg, pc, run


configs = validate   # the name notebooks and tests know


def _paths(a, p: Problems) -> None:
    """Every output path must be creatable and writable before we start."""
    p.output_dir("out", a.out)
    if a.metrics is not None:
        p.output_file("metrics", a.metrics)
    if a.save is not None:
        p.output_dir("save", a.save)
    if a.resume not in (None, "auto"):
        p.input_dir("resume", a.resume)


def _run_rules(cfg, pc, run: RunConfig, p: Problems) -> None:
    if run.save_every and not run.save:
        p.add(f"{p.show('save_every', run.save_every)} saves checkpoints: add --save DIR")
    if run.resume == "auto" and not run.save:
        p.add("--resume auto resumes from --save's directory: add --save DIR")
    if run.resume_step is not None and run.resume in (None, "auto"):
        p.add(f"{p.show('resume_step', run.resume_step)} picks a step of a checkpoint directory: add --resume DIR")
    if run.resume not in (None, "auto") and os.path.isdir(run.resume):
        try:
            doc = checkpoint.read_metadata(run.resume, run.resume_step)
        except checkpoint.CheckpointError as e:
            p.add(f"--resume {run.resume}: {e}")
        else:
            _resume_rules(cfg, run, doc, p)
    if run.inject_fault is not None:
        r, s = run.inject_fault
        if not 0 <= r < pc.world_size or not 1 <= s <= run.steps:
            p.add(f"--inject-fault {r}:{s}: the rank must be in 0..{pc.world_size - 1} and the step in 1..{run.steps}")
    if runtime.is_torchrun() and run.max_restarts:
        p.add("under torchrun, restarts are torchrun's: pass --max-restarts to torchrun and --resume auto here")


def _resume_rules(cfg: GPTConfig, run: RunConfig, doc: dict, p: Problems) -> None:
    saved = doc["meta"].get("config", {})
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (this run: {v})" for k, v in cfg.to_dict().items()
             if k in saved and saved[k] != v and k != "moe_groups"]
    if diffs:
        p.add(f"--resume {run.resume}: the checkpoint holds another model; it was saved with " + ", ".join(diffs))
    if doc["step"] >= run.steps:
        p.add(f"--resume {run.resume}: its step {doc['step']} is not before --steps {run.steps}: raise --steps")


def _memory(cfg: GPTConfig, pc: ParallelConfig, run: RunConfig, p: Problems) -> None:
    """Refuse what cannot fit in this machine's memory, rather than be killed minutes later.
    A lower bound: every local rank builds the full fp32 model (4Ψ bytes) and keeps its slice's
    parameters, gradients and AdamW moments (16Ψ/(tp·pp)) plus its activations (Korthikanti 2022:
    about 34·sbh bytes per layer in 16-bit, twice that in fp32); the check runs the reference too."""
    free = free_memory_bytes()
    if runtime.is_torchrun() or free is None:
        return
    psi = cfg.num_params()
    tokens = run.batch * cfg.seq
    act = 68 * tokens * cfg.hidden * cfg.layers + 4 * tokens * cfg.vocab * 3
    need = pc.world_size * (4 * psi + 16 * psi / (pc.tp * pc.pp) + act / (pc.dp * pc.ep * pc.cp * pc.tp * pc.pp))
    need += (20 * psi + act) if run.check else 0
    if need > free:
        p.add(f"this model ({psi / 1e6:,.0f}M parameters, batch {run.batch}x{cfg.seq}) needs at least "
              f"{need / 2**30:,.1f} GiB on {pc.world_size} local ranks; {free / 2**30:,.1f} GiB are free: "
              "lower --hidden, --layers, --vocab or --batch")


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
        checkpoint.save(directory, step, shards, meta={"config": cfg.to_dict(), "seed": seed, "losses": list(losses)},
                        layout=pc.to_dict())


# ----------------------------------------------------------------------------- one rank
def train_rank(cfg: GPTConfig, pc: ParallelConfig, run: RunConfig, attempt: int = 0, resume_from: str | None = None) -> dict:
    """One rank's training loop (inside `launch` or under torchrun). `resume_from`: a checkpoint
    directory (its newest step, or run.resume_step); `attempt` counts restarts (faults are
    injected on attempt 0 only)."""
    torch.manual_seed(run.seed)
    mesh = Mesh(**pc.axes())
    dev = runtime.device()
    schedule = build_schedule(pc.schedule, pc.pp, pc.microbatches, pc.chunks) if pc.pp > 1 or pc.chunks > 1 else None
    state, start, history = None, 0, []
    if resume_from:
        ck = checkpoint.load(resume_from, run.resume_step if attempt == 0 else None)
        ck.check_meta(config=cfg.to_dict())
        start, history = ck.step, list(ck.meta.get("losses", []))[:ck.step]
        state = {k.split("/", 1)[1]: ck.full(k) for k in ck.keys() if k.startswith("param/")}
    stages = {s: st.to(dev) for s, st in build_stages(cfg, pc, mesh, run.seed, state, schedule).items()}
    named = [(n, p) for st in stages.values() for n, p in st.named_parameters()]
    opt = Optimizer(named, pc, module=stages if pc.zero >= 2 else None,
                    mirror=mirror_group(mesh, pc.pp) if pc.schedule == "dualpipe" and schedule else None)
    if resume_from:
        opt.load_moments({n: tuple(_local_slice(ck.full(f"{k}/{n}"), p, pc) for k in ("exp_avg", "exp_avg_sq"))
                          for n, p in named}, start)
        del ck, state
    data = SyntheticData(cfg.vocab, cfg.seq, run.seed)
    shards, shard = pc.dp * pc.ep, mesh.index("dp") * pc.ep + mesh.index("ep")
    m, runner = pc.microbatches, None
    # a rank computes losses if it holds the last stage of some micro-batch's path (DualPipe: two)
    last_stage = schedule is None or any(s == path[-1] for path in schedule.paths for s in stages)
    if schedule is not None:
        coords = mesh.coords()
        seq_local = cfg.seq // pc.cp // (pc.tp if pc.sp else 1)
        runner = StepRunner(schedule, validate_schedule(schedule)[mesh.index("pp")], stages,
                            lambda mb: (run.batch // shards // m, seq_local, cfg.hidden),
                            rank=mesh.index("pp"), peer=lambda r: mesh.rank_of(**{**coords, "pp": r}),
                            loss=lambda logits, y: loss_of(logits, y, pc), group="pp")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=pc.precision == "bf16")
    losses, times, peaks, stopped, saved = list(history), [], [], 0, None
    metrics = open(run.metrics, "a") if run.metrics and runtime.rank() == 0 else None
    for step in tqdm(range(start, run.steps), disable=runtime.rank() != 0, desc=_describe(pc), file=sys.stdout):
        if run.inject_fault == (runtime.rank(), step + 1) and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)   # the fault a test asked for: this rank dies here
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
                    aux = runner.aux_sum   # MoE stages' load-balancing losses, on every stage
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
        # One copy of each data shard's loss: the cross-entropy of tp rank 0 (every tp rank holds it),
        # and the MoE aux loss of tp rank 0, or of every tp rank under SP (each holds a share).
        tp0 = mesh.index("tp") == 0
        mine = (local if last_stage and tp0 else 0.0) + (aux if tp0 or pc.sp else 0.0)
        book = torch.tensor([mine, runtime.stop_requested()], dtype=torch.float64)
        with trace.enabled(False):
            total = comm.all_reduce(book[:1].clone()).item() / (shards * pc.cp)
            stop = int(comm.all_reduce(book[1:].clone(), op="max").item())   # every rank stops at the same step
            peak = comm.all_gather(torch.tensor([_peak_mb()], dtype=torch.float64))
        losses.append(total)
        peaks.append(peak.tolist())
        times.append(time.perf_counter() - t0)
        runtime.heartbeat()
        if metrics is not None:
            metrics.write(json.dumps({"step": step + 1, "loss": total, "tokens_per_s": run.batch * cfg.seq / times[-1],
                                      "step_time_s": times[-1], "peak_mem_mb": peaks[-1], "attempt": attempt}) + "\n")
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
    return {"losses": losses, "times": times, "peaks": peaks, "start": start, "events": trace.gather(),
            "state_bytes": opt.state_bytes(), "coords": mesh.coords(), "stopped": stopped, "saved": saved}


def _describe(pc: ParallelConfig) -> str:
    return " x ".join(f"{k}{v}" for k, v in pc.axes().items() if v > 1) or "1 rank"


def _peak_mb() -> float:
    if runtime.device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_peak_mb()


def _rss_peak_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:   # VmHWM: the process's peak resident memory
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
            open(run.metrics, "w").close()   # a fresh run starts a fresh file; a resumed one appends
    if a.sp and a.tp == 1:
        print("note: --sp has no effect with --tp 1 (Megatron-LM turns it off likewise)")
    attempt, t = 0, time.time()
    while True:
        try:
            res = runtime.launch(train_rank, pc.world_size, cfg, pc, run, attempt, resume, timeout=run.timeout,
                                 progress_timeout=run.timeout, grace=run.timeout)
            break
        except runtime.RankError as e:
            reason = _one_line(e)
            if attempt >= run.max_restarts:
                print(f"\nerror: {reason}\n{e.remote_traceback}", file=sys.stderr)
                return 1
            attempt += 1
            resume = _newest(run.save)
            step = checkpoint.read_metadata(resume)["step"] if resume else 0
            print(f"\nrestart {attempt} of {run.max_restarts}: {reason}; resuming from "
                  + (f"step {step} ({resume})" if resume else "the start (no checkpoint)"), flush=True)
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
        print(f"stopped by {sig.name} after step {r0['start'] + len(r0['times'])}"
              + (f"; saved it to {run.save}" if r0["saved"] else " (no --save: nothing kept)"))
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


def report(run: RunConfig, cfg: GPTConfig, pc: ParallelConfig, r0: dict, wall: float, restarts: int = 0) -> None:
    if not r0["times"]:
        return
    tokens = run.batch * cfg.seq
    step_time = sorted(r0["times"])[len(r0["times"]) // 2]
    print(f"\nminipar.train: GPT {cfg.layers}x{cfg.hidden} on {pc.world_size} ranks ({_describe(pc)}, "
          f"zero={pc.zero}{', sp' if pc.sp else ''}{', ' + pc.schedule if pc.pp > 1 else ''}), "
          f"{len(r0['losses'])} steps in {wall:.1f}s" + (f" with {restarts} restart(s)" if restarts else ""))
    print(f"loss {r0['losses'][0]:.4f} -> {r0['losses'][-1]:.4f}; median step {step_time * 1e3:.1f} ms, "
          f"{tokens / step_time:,.0f} tokens/s; peak memory per rank (MB): "
          f"{[round(x) for x in r0['peaks'][-1]]}")
    if runtime.device().type == "cuda":
        print(gpu_utilization(cfg, pc, run, step_time))
    evs = r0["events"]
    print("\ncommunication in the last step, rank 0 (logical payload bytes):")
    print(trace.format_summary([e for e in evs if e.rank == 0]))
    trace.to_chrome_trace(evs, os.path.join(run.out, "trace.json"))
    matplotlib.use("Agg")
    ax = plot_timeline(evs, title=f"last step, {_describe(pc)} (wall clock, {pc.world_size} ranks on this machine)")
    png = os.path.join(run.out, "timeline.png")
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=110)
    matplotlib.pyplot.close(ax.figure)
    print(f"\nwrote {png} and {os.path.join(run.out, 'trace.json')} (open it in https://ui.perfetto.dev)")


def gpu_utilization(cfg, pc, run, step_time) -> str:
    """MFU on a GPU: Megatron-LM's model FLOPs (Narayanan et al. 2021, eq. 3) over the bf16 peak."""
    name = torch.cuda.get_device_name().lower()   # e.g. "nvidia h100 80gb hbm3"
    known = [k for k in GPUS if k in name]
    if not known:
        return f"MFU: {name!r} is not in minipar.plan.hardware (add it with plan.add_gpu)"
    f = model_flops(cfg.layers, cfg.hidden, cfg.vocab, cfg.seq, run.batch)
    return (f"MFU {mfu(f, step_time, pc.world_size, get_gpu(known[0]).peak_flops):.1%} (Megatron-LM model "
            f"FLOPs over the {known[0]}'s bf16 dense peak)")


if __name__ == "__main__":
    sys.exit(main())
