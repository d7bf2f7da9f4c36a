"""Exercise of notebook 08: choose an N-D layout for a model and a cluster, checked by the planner.

`solution()` returns dict(tp, pp, dp, zero_stage) for Llama-2-13B on 16 H100s (2 nodes of 8).
It must multiply to 16, keep tp inside a node, fit in 80 GB, and reach 85% of the planner's best
predicted MFU. The planner's own search (`plan.plan`) is disabled while it runs.
"""

from __future__ import annotations

from functools import lru_cache

from .. import plan
from . import Case, Exercise, exercise

MODEL, GPUS, GPU = "13b", 16, "h100"
WITHIN = 0.85


@lru_cache(maxsize=None)
def _best():
    return plan.plan(MODEL, gpus=GPUS, gpu=GPU).best


def _cases(rng):
    return [Case(f"Llama-2-{MODEL.upper()} on {GPUS} x {GPU.upper()}")]


def _judge(case, outputs):
    layout = outputs[0]
    need = {"tp", "pp", "dp", "zero_stage"}
    if not isinstance(layout, dict) or not need <= set(layout):
        return (f"return a dict with keys {sorted(need)}, got {layout!r}", "")
    tp, pp, dp, z = (int(layout[k]) for k in ("tp", "pp", "dp", "zero_stage"))
    if tp * pp * dp != GPUS:
        return (
            f"tp*pp*dp = {tp * pp * dp}, but there are {GPUS} GPUs",
            "the layout's axes must multiply to the number of GPUs",
        )
    gpn = plan.get_gpu(GPU).gpus_per_node
    if tp > gpn:
        return (
            f"tp={tp} spans more than one node of {gpn} GPUs",
            "tensor parallelism all-reduces inside every layer: keep it on NVLink, within a node",
        )
    M = plan.get_model(MODEL)
    try:
        e = plan.estimate(
            M.layers,
            M.hidden,
            M.heads,
            M.vocab,
            M.seq,
            M.global_batch,
            1,
            GPUS,
            GPU,
            tp=tp,
            pp=pp,
            dp=dp,
            zero_stage=z,
            **M.arch_kwargs(),
        )
    except ValueError as err:
        return (f"the planner rejects this layout: {err}", "")
    gb = e.memory_per_gpu / 1e9
    if not e.fits:
        return (
            f"needs {gb:.1f} GB per GPU: it does not fit in 80 GB",
            "shard more: tensor or pipeline parallelism split weights and activations; ZeRO shards the model "
            "states over dp",
        )
    best = _best()
    if e.mfu < WITHIN * best.mfu:
        return (
            f"it fits ({gb:.1f} GB) but predicts MFU {e.mfu:.1%}, below {WITHIN:.0%} of the best layout's "
            f"{best.mfu:.1%}",
            "ZeRO-3 gathers every weight twice per step and large tp shrinks each GEMM: "
            "shard no more than memory requires",
        )
    return None


exercise(
    Exercise(
        name="nd_layout",
        notebook="08_nd_parallelism",
        function="pick_layout",
        cases=_cases,
        judge=_judge,
        forbidden=(plan.plan,),
        deadline=30.0,
        summary=f"the layout fits in 80 GB and predicts at least {WITHIN:.0%} of the planner's best MFU",
    )
)
