"""python -m minipar.plan --model llama3-405b --gpus 8192 --gpu h100

Ranks the layouts (tp, pp, v, dp, cp, ep, micro-batch, ZeRO stage, recompute, schedule)
that fit in memory by predicted step time, and explains the winner.

    python -m minipar.plan serve --model 70b --gpus 8 --latency-ms 30

picks a serving layout instead (see minipar.plan.serving).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..validation import ArgumentParser, ConfigError, Float, Int, Problems, exit_on_error
from .arch import MODELS, ModelShape
from .estimate import ASSUMPTIONS
from .hardware import GPUS, LINKS
from .planner import plan
from .serving import main as serve_main
from .topology import TOPOLOGIES

CUSTOM = ("layers", "hidden", "heads", "vocab", "seq", "global_batch")


def parse_args(argv=None):
    ap = ArgumentParser(
        prog="python -m minipar.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default="llama3-70b",
        help=f"a preset ({', '.join(MODELS)}) or 'custom' with "
        "--layers/--hidden/--heads/--vocab/--seq/--global-batch (default llama3-70b)",
    )
    ap.add_argument("--gpus", type=Int, default=64, help="number of GPUs (default 64)")
    ap.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    ap.add_argument("--topology", help=f"the cluster, one of {', '.join(TOPOLOGIES)} (default: the GPU's)")
    ap.add_argument("--global-batch", type=Int, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq", type=Int, help="sequence length (default: the preset's)")
    for k in ("layers", "hidden", "heads", "vocab"):
        ap.add_argument(f"--{k}", type=Int, help="for --model custom (required)")
    for k in ("kv-heads", "ffn-hidden", "experts", "top-k"):
        ap.add_argument(f"--{k}", type=Int, help="for --model custom (optional)")
    ap.add_argument("--gated-mlp", action="store_true", help="for --model custom: SwiGLU's three matrices")
    ap.add_argument(
        "--gpus-per-node", type=Int, help="GPUs sharing NVLink and a host's NICs (overrides the topology)"
    )
    ap.add_argument(
        "--network", help=f"link between nodes, one of {', '.join(LINKS)} (overrides the topology's NIC)"
    )
    ap.add_argument("--top", type=Int, default=5, help="how many layouts to list (default 5)")
    ap.add_argument(
        "--overlap-dp",
        action="store_true",
        help="hide the gradient reduce-scatter and parameter "
        "all-gather behind compute (Megatron-Core --overlap-grad-reduce --overlap-param-gather)",
    )
    ap.add_argument(
        "--overlap-tp",
        action="store_true",
        help="hide TP collectives behind the GEMMs (Megatron-Core --tp-comm-overlap)",
    )
    ap.add_argument(
        "--no-flash-attention",
        action="store_true",
        help="attention scores go through HBM (pre-2022 kernels); flash attention is the default",
    )
    ap.add_argument(
        "--flash-attention", action="store_true", help=argparse.SUPPRESS
    )  # the old switch: now the default
    ap.add_argument(
        "--memory-reserve",
        type=Float,
        help=f"fraction of HBM kept free (default {ASSUMPTIONS.memory_reserve})",
    )
    return ap.parse_args(argv)


def check(a) -> ModelShape | str:
    """Every problem with the command line, one line each (ConfigError); the model to plan."""
    p = Problems(cli=True)
    p.integer("gpus", a.gpus)
    p.integer("top", a.top)
    for k in (
        "global_batch",
        "seq",
        "gpus_per_node",
        "layers",
        "hidden",
        "heads",
        "vocab",
        "kv_heads",
        "ffn_hidden",
        "top_k",
    ):
        if getattr(a, k) is not None:
            p.integer(k, getattr(a, k))
    if a.experts is not None:
        p.integer("experts", a.experts, low=0)
    if a.memory_reserve is not None:
        p.number("memory_reserve", a.memory_reserve, 0, 1, why="a fraction of the GPU's memory")
    if a.gpu.lower() not in GPUS:
        p.add(f"--gpu {a.gpu!r} is not one of: {', '.join(GPUS)}")
    if a.topology is not None and a.topology.lower() not in TOPOLOGIES:
        p.add(f"--topology {a.topology!r} is not one of: {', '.join(TOPOLOGIES)}")
    if a.network is not None and a.network.lower() not in LINKS:
        p.add(f"--network {a.network!r} is not one of: {', '.join(LINKS)}")
    model = a.model
    if model == "custom":
        missing = [k for k in CUSTOM if getattr(a, k) is None]
        if missing:
            p.add("--model custom needs " + ", ".join("--" + k.replace("_", "-") for k in missing))
    elif model.lower() not in MODELS:
        p.add(f"--model {model!r} is not one of: {', '.join(MODELS)}, custom")
    p.raise_if_any("the planner cannot run")
    if model == "custom":
        moe = dict(experts=a.experts, top_k=a.top_k or 1, expert_ffn_hidden=a.ffn_hidden) if a.experts else {}
        model = ModelShape(
            a.layers,
            a.hidden,
            a.heads,
            a.vocab,
            a.seq,
            a.global_batch,
            "custom",
            kv_heads=a.kv_heads,
            ffn_hidden=a.ffn_hidden,
            gated_mlp=a.gated_mlp,
            **moe,
        )
    return model


@exit_on_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the serving planner: TP/PP layout under a latency target
        return serve_main(argv[1:])
    a = parse_args(argv)
    model = check(a)
    A = replace(
        ASSUMPTIONS,
        flash_attention=not a.no_flash_attention,
        **({"memory_reserve": a.memory_reserve} if a.memory_reserve is not None else {}),
    )
    try:
        p = plan(
            model,
            a.gpus,
            a.gpu,
            global_batch=a.global_batch,
            seq=a.seq,
            overlap_dp=a.overlap_dp,
            overlap_tp=a.overlap_tp,
            gpus_per_node=a.gpus_per_node,
            inter_node=a.network,
            topology=a.topology,
            assumptions=A,
        )
    except ConfigError:
        raise
    except ValueError as e:  # no layout fits / none splits the batch: one line, how to fix it
        raise ConfigError([str(e)], "no plan") from None
    print(p.explain())
    print()
    print(p.table(a.top))
    print(f"\nassumptions: {A}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
