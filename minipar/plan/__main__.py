"""python -m minipar.plan --model 70b --gpus 64 --gpu h100

Ranks the layouts (tp, pp, v, dp, cp, micro-batch, ZeRO stage, recompute, schedule)
that fit in memory by predicted step time, and explains the winner.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .estimate import ASSUMPTIONS
from .hardware import GPUS, LINKS
from .planner import MODELS, ModelShape, plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minipar.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="70b", help=f"a preset ({', '.join(MODELS)}) or "
                    "'custom' with --layers/--hidden/--heads/--vocab (default 70b)")
    ap.add_argument("--gpus", type=int, default=64, help="number of GPUs (default 64)")
    ap.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    ap.add_argument("--global-batch", type=int, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq", type=int, help="sequence length (default: the preset's)")
    for k in ("layers", "hidden", "heads", "vocab"):
        ap.add_argument(f"--{k}", type=int, help="for --model custom")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs sharing NVLink (default 8)")
    ap.add_argument("--network", help=f"link between nodes, one of {', '.join(LINKS)} (default: the GPU's)")
    ap.add_argument("--top", type=int, default=5, help="how many layouts to list (default 5)")
    ap.add_argument("--overlap-dp", action="store_true", help="hide the gradient reduction behind backward")
    ap.add_argument("--flash-attention", action="store_true",
                    help="attention scores never reach HBM (time model); pair with selective recompute")
    a = ap.parse_args(argv)
    assumptions = replace(ASSUMPTIONS, flash_attention=True) if a.flash_attention else ASSUMPTIONS
    try:
        model = a.model
        if model == "custom":
            missing = [k for k in ("layers", "hidden", "heads", "vocab", "seq", "global_batch") if getattr(a, k) is None]
            if missing:
                raise ValueError("--model custom needs " + ", ".join("--" + k.replace("_", "-") for k in missing))
            model = ModelShape(a.layers, a.hidden, a.heads, a.vocab, a.seq, a.global_batch, "custom")
        p = plan(model, a.gpus, a.gpu, global_batch=a.global_batch, seq=a.seq, overlap_dp=a.overlap_dp,
                 gpus_per_node=a.gpus_per_node, inter_node=a.network, assumptions=assumptions)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(p.explain())
    print()
    print(p.table(a.top))
    print(f"\nassumptions: {assumptions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
