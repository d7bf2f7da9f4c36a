"""A training run's configuration: the command line's flags, parsed and checked once.

`parse_args` reads the flags of `python -m minipar.train`; `validate` turns them into the three
configs a run needs (the model's `GPTConfig`, the layout's `compose.ParallelConfig`, the run's
`RunConfig`) or a `ConfigError` listing every problem, each with its fix, before any rank starts.
The rules of each strategy live in its module (`compose.check` calls them all); the ones here
are about the run itself: paths, checkpoints, faults, and this machine's memory.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from . import checkpoint, runtime
from .compose import TRAIN_SCHEDULES, ParallelConfig, check
from .model import GPTConfig
from .validation import ArgumentParser, Float, Int, Invalid, Problems, free_memory_bytes

__all__ = ["parse_args", "validate", "RunConfig"]


def _ints(text: str):
    """argparse type for '3,4,4,3' (or Invalid)."""
    vals = [Int(x) for x in text.split(",")]
    return (
        Invalid(text, "comma-separated whole numbers")
        if any(isinstance(v, Invalid) for v in vals)
        else tuple(vals)
    )


def _fault(text: str):
    """argparse type for RANK:STEP (or Invalid)."""
    parts = text.split(":")
    vals = [Int(x) for x in parts]
    if len(parts) != 2 or any(isinstance(v, Invalid) for v in vals):
        return Invalid(text, "RANK:STEP")
    return tuple(vals)


def parse_args(argv=None, description: str = ""):
    """The flags of `python -m minipar.train` (`description` heads its --help)."""
    p = ArgumentParser(
        prog="python -m minipar.train",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("layout (their product is the number of ranks)")
    g.add_argument("--dp", type=Int, default=2, help="data-parallel replicas [2]")
    g.add_argument("--pp", type=Int, default=2, help="pipeline stages [2]")
    g.add_argument("--tp", type=Int, default=2, help="tensor-parallel ranks, innermost [2]")
    g.add_argument("--cp", type=Int, default=1, help="context-parallel ranks (sequence split) [1]")
    g.add_argument("--ep", type=Int, default=1, help="expert-parallel ranks (needs --experts) [1]")
    s = p.add_argument_group("strategies")
    s.add_argument(
        "--zero",
        type=Int,
        default=1,
        help="ZeRO stage over dp: 0 all-reduce, 1 optimizer state, "
        "2 + gradients, 3 + parameters (FSDP; with pp, 2 and 3 need gpipe, 1f1b or interleaved_1f1b) [1]",
    )
    s.add_argument(
        "--sp", action="store_true", help="sequence parallelism inside the tp group (no effect at tp 1)"
    )
    s.add_argument(
        "--schedule", default="1f1b", help=f"pipeline schedule: {', '.join(TRAIN_SCHEDULES)} [1f1b]"
    )
    s.add_argument(
        "--microbatches", type=Int, default=4, help="micro-batches per step (gradient accumulation) [4]"
    )
    s.add_argument(
        "--chunks", type=Int, default=1, help="model chunks per pipeline rank, v (interleaved) [1]"
    )
    s.add_argument(
        "--stage-layers",
        type=_ints,
        default=None,
        help="blocks per model part, e.g. 3,4,4,3 (pp*chunks numbers) [balanced: equal, or fewer on "
        "the first and last stages, which hold the embedding and the head]",
    )
    s.add_argument("--cp-method", default="ring", help="context-parallel attention: ring, ulysses [ring]")
    s.add_argument("--cp-layout", default="zigzag", help="ring's sequence split: zigzag, contiguous [zigzag]")
    s.add_argument("--recompute", default=None, help="activation recompute per block: full, selective [none]")
    s.add_argument(
        "--precision", default="fp32", help="compute precision: fp32, bf16; masters stay fp32 [fp32]"
    )
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
    r.add_argument(
        "--metrics", default=None, help="append one JSON line per step (and per restart) to this file"
    )
    r.add_argument(
        "--save", default=None, help="checkpoint directory; the last completed step is always saved"
    )
    r.add_argument(
        "--save-every", type=Int, default=0, help="also save every N steps (with --save) [0: only the last]"
    )
    r.add_argument(
        "--resume",
        default=None,
        help="resume from this checkpoint directory (any layout), or 'auto': "
        "the newest in --save's directory, else start fresh",
    )
    r.add_argument("--resume-step", type=Int, default=None, help="the step to resume from [the newest]")
    r.add_argument(
        "--max-restarts",
        type=Int,
        default=0,
        help="restart a run whose rank died, from its newest checkpoint, at most this many times [0]",
    )
    r.add_argument(
        "--inject-fault",
        type=_fault,
        default=None,
        metavar="RANK:STEP",
        help="SIGKILL rank RANK when it reaches step STEP, on the first attempt only (for tests)",
    )
    r.add_argument(
        "--optimizer",
        default="adamw",
        help="adamw, or sgd (no normalization: sharp parameter "
        "parity, see minipar.model.make_optimizer) [adamw]",
    )
    r.add_argument(
        "--fused-adamw",
        action="store_true",
        help="torch's fused AdamW kernel (one kernel per step on a GPU; the same math)",
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every transformer block (GPU speed; on a "
        "CPU the first step compiles for minutes)",
    )
    r.add_argument("--no-check", action="store_true", help="skip the single-device comparison")
    r.add_argument(
        "--timeout",
        type=Float,
        default=120,
        help="seconds any collective may wait, and a step may take, before the run counts as hung [120]",
    )
    a, a.unknown = p.parse_known_args(argv)  # unknown flags become one problem among the others
    return a


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
    resume: str | None = None  # a checkpoint directory, or "auto" (--save's, if it has one)
    resume_step: int | None = None
    max_restarts: int = 0
    inject_fault: tuple | None = None  # (rank, step)
    check: bool = True
    timeout: float = 120.0
    optimizer: str = "adamw"  # or "sgd" (parity tests of parameters: see model.make_optimizer)
    fused: bool = False  # torch's fused AdamW
    compile: bool = False  # torch.compile each block
    capture: bool = False  # return the first step's gradients and the final parameters, full shape


def validate(a) -> tuple[GPTConfig, ParallelConfig, RunConfig]:
    """Every flag and every rule between flags, before any rank starts: a ConfigError whose
    lines are the problems, each saying how to fix it. The rules of each strategy live in its
    module (`compose.check` calls them all); the ones here are about the run itself."""
    p = Problems(cli=True)
    if getattr(a, "unknown", None):
        p.add(f"unrecognized arguments: {' '.join(a.unknown)} (see python -m minipar.train --help)")
    for f in (
        "dp",
        "pp",
        "tp",
        "cp",
        "ep",
        "microbatches",
        "chunks",
        "layers",
        "hidden",
        "heads",
        "seq",
        "vocab",
        "batch",
        "steps",
    ):
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
    p.choice("optimizer", a.optimizer, ("adamw", "sgd"))
    if a.fused_adamw and a.optimizer != "adamw":
        p.add("--fused-adamw is torch's fused AdamW kernel: it needs --optimizer adamw")
    for f, kind in (
        ("stage_layers", "comma-separated layer counts such as 3,4,4,3"),
        ("inject_fault", "RANK:STEP"),
        ("resume_step", "a step number"),
    ):
        v = getattr(a, f)
        if isinstance(v, Invalid) or (f == "resume_step" and v is not None and not p.integer(f, v, low=1)):
            if isinstance(v, Invalid):
                p.add(f"{p.show(f, v.text)} must be {kind}")
    _paths(a, p)
    if p:  # the rules between flags need sane sizes first
        p.raise_if_any()
    if a.experts:
        p.integer("top_k", a.top_k, high=a.experts, why="each token picks top-k distinct experts")
    p.divides("heads", a.heads, "hidden", a.hidden, "each attention head is hidden/heads wide")
    if p:
        p.raise_if_any()
    cfg = GPTConfig.from_flags(a, moe_groups=a.dp * a.ep * a.microbatches if a.experts else 1)
    pc = ParallelConfig(
        dp=a.dp,
        pp=a.pp,
        tp=a.tp,
        cp=a.cp,
        ep=a.ep,
        zero=a.zero,
        sp=a.sp and a.tp > 1,
        schedule=a.schedule,
        microbatches=a.microbatches,
        chunks=a.chunks,
        cp_method=a.cp_method,
        cp_layout=a.cp_layout,
        recompute=a.recompute,
        precision=a.precision,
        stage_layers=a.stage_layers,
    )
    check(cfg, pc, a.batch, problems=p)
    run = RunConfig(
        steps=a.steps,
        batch=a.batch,
        seed=a.seed,
        out=a.out,
        metrics=a.metrics,
        save=a.save,
        save_every=a.save_every,
        resume=a.resume,
        resume_step=a.resume_step,
        max_restarts=a.max_restarts,
        inject_fault=a.inject_fault,
        check=not a.no_check,
        timeout=float(a.timeout),
        optimizer=a.optimizer,
        fused=a.fused_adamw,
        compile=a.compile,
    )
    _run_rules(cfg, pc, run, p)
    _memory(cfg, pc, run, p)
    p.raise_if_any()
    return cfg, pc, run


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
        p.add(
            f"{p.show('resume_step', run.resume_step)} picks a step of a checkpoint directory: add --resume DIR"
        )
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
            p.add(
                f"--inject-fault {r}:{s}: the rank must be in 0..{pc.world_size - 1} and the step in 1..{run.steps}"
            )
    if runtime.is_torchrun() and run.max_restarts:
        p.add(
            "under torchrun, restarts are torchrun's: pass --max-restarts to torchrun and --resume auto here"
        )


def _resume_rules(cfg: GPTConfig, run: RunConfig, doc: dict, p: Problems) -> None:
    saved = doc["meta"].get("config", {})
    diffs = [
        f"--{k.replace('_', '-')} {saved[k]} (this run: {v})"
        for k, v in cfg.to_dict().items()
        if k in saved and saved[k] != v and k != "moe_groups"
    ]
    if diffs:
        p.add(
            f"--resume {run.resume}: the checkpoint holds another model; it was saved with "
            + ", ".join(diffs)
        )
    if doc["step"] >= run.steps:
        p.add(
            f"--resume {run.resume}: its step {doc['step']} is not before --steps {run.steps}: raise --steps"
        )


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
    need = pc.world_size * (
        4 * psi + 16 * psi / (pc.tp * pc.pp) + act / (pc.dp * pc.ep * pc.cp * pc.tp * pc.pp)
    )
    need += (20 * psi + act) if run.check else 0
    if need > free:
        p.add(
            f"this model ({psi / 1e6:,.0f}M parameters, batch {run.batch}x{cfg.seq}) needs at least "
            f"{need / 2**30:,.1f} GiB on {pc.world_size} local ranks; {free / 2**30:,.1f} GiB are free: "
            "lower --hidden, --layers, --vocab or --batch"
        )
