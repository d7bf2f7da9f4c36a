"""Exercise of notebook 08: choose an N-D layout for a model and a cluster, checked by the planner."""
from __future__ import annotations

from . import Verdict, checker

MODEL, GPUS, GPU = "13b", 16, "h100"


def reference_layout() -> dict:
    """A good answer: TP inside a node keeps the weights and activations in memory without
    paying ZeRO-3's extra all-gathers; two-way TP is enough for 13B on 80 GB."""
    return dict(tp=2, pp=1, dp=8, zero_stage=1)


@checker("nd_layout")
def check_nd_layout(solution, within: float = 0.85) -> Verdict:
    """`solution()` returns dict(tp, pp, dp, zero_stage) for Llama-2-13B on 16 H100s (2 nodes of 8).
    It must multiply to 16, keep tp inside a node, fit in 80 GB, and reach `within` of the
    planner's best predicted MFU."""
    from .. import plan
    layout = solution()
    need = {"tp", "pp", "dp", "zero_stage"}
    if not isinstance(layout, dict) or not need <= set(layout):
        return Verdict(False, f"return a dict with keys {sorted(need)}, got {layout!r}")
    tp, pp, dp, z = (int(layout[k]) for k in ("tp", "pp", "dp", "zero_stage"))
    if tp * pp * dp != GPUS:
        return Verdict(False, f"tp*pp*dp = {tp * pp * dp}, but there are {GPUS} GPUs",
                       "the layout's axes must multiply to the number of GPUs")
    gpn = plan.get_gpu(GPU).gpus_per_node
    if tp > gpn:
        return Verdict(False, f"tp={tp} spans more than one node of {gpn} GPUs",
                       "tensor parallelism all-reduces inside every layer: keep it on NVLink, within a node")
    M = plan.get_model(MODEL)
    try:
        e = plan.estimate(M.layers, M.hidden, M.heads, M.vocab, M.seq, M.global_batch, 1, GPUS, GPU,
                          tp=tp, pp=pp, dp=dp, zero_stage=z, **M.arch_kwargs())
    except ValueError as err:
        return Verdict(False, f"the planner rejects this layout: {err}")
    gb = e.memory_per_gpu / 1e9
    if not e.fits:
        return Verdict(False, f"needs {gb:.1f} GB per GPU: it does not fit in 80 GB",
                       "shard more: tensor or pipeline parallelism split weights and activations; "
                       "ZeRO shards the model states over dp", [f"memory: { {k: round(v / 1e9, 1) for k, v in e.memory.items()} } GB"])
    best = plan.plan(MODEL, gpus=GPUS, gpu=GPU).best
    if e.mfu < within * best.mfu:
        return Verdict(False, f"it fits ({gb:.1f} GB) but predicts MFU {e.mfu:.1%}, below {within:.0%} of the "
                       f"best layout's {best.mfu:.1%}",
                       "ZeRO-3 gathers every weight twice per step and large tp shrinks each GEMM: shard no more "
                       "than memory requires")
    return Verdict(True, f"tp={tp} pp={pp} dp={dp} ZeRO-{z}: {gb:.1f} GB per GPU, predicted MFU {e.mfu:.1%} "
                   f"(planner's best {best.mfu:.1%})")
