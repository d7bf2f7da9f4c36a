"""Exercise of notebook 09: the memory of one GPU in a 3D-parallel layout."""
from __future__ import annotations

from . import Verdict, checker


def memory_per_gpu(psi, layers, hidden, heads, seq, micro_batch, tp, pp, dp, zero_stage, recompute):
    """Reference solution: bytes on the first pipeline stage's GPU under 1F1B with TP + SP.

    Model states of its Ψ/(t·p) parameters by ZeRO stage over d ranks (ZeRO 2020), plus
    activations: l/p layers × p micro-batches in flight × Korthikanti's per-layer bytes."""
    from ..plan import activation_bytes_per_layer, model_state_bytes
    states = model_state_bytes(psi / (tp * pp), dp, zero_stage)
    in_flight = pp                          # 1F1B: stage 0 holds p micro-batches at its peak
    acts = layers / pp * in_flight * activation_bytes_per_layer(seq, micro_batch, hidden, heads, tp,
                                                                sequence_parallel=True, recompute=recompute)
    return states + acts


# (Ψ, l, h, a, s, b, t, p, d, ZeRO, recompute): small and large, each term dominant somewhere
CASES = [
    (7e9, 32, 4096, 32, 4096, 1, 1, 1, 8, 1, "selective"),
    (70e9, 80, 8192, 64, 4096, 1, 8, 4, 2, 1, "selective"),
    (70e9, 80, 8192, 64, 4096, 2, 4, 8, 2, 3, None),
    (175e9, 96, 12288, 96, 2048, 1, 8, 8, 16, 2, "full"),
    (13e9, 40, 5120, 40, 8192, 1, 2, 2, 16, 0, None),
]


@checker("memory_per_gpu")
def check_memory_per_gpu(solution) -> Verdict:
    """`solution(psi, layers, hidden, heads, seq, micro_batch, tp, pp, dp, zero_stage, recompute)`
    must return the first stage's bytes within 1% of the reference on every case."""
    for case in CASES:
        want = memory_per_gpu(*case)
        got = solution(*case)
        if not isinstance(got, (int, float)) or got != got:
            return Verdict(False, f"expected a number of bytes, got {got!r}", "return a float (bytes)")
        if abs(got / want - 1) > 0.01:
            psi, l, h, a, s, b, t, p, d, z, rc = case
            hint = ("model states: ZeRO shards over d ranks, and TP and PP already split Ψ over t·p GPUs; "
                    "activations: 1F1B keeps p micro-batches of l/p layers on stage 0; with SP every term "
                    "of Korthikanti's sbh(34 + 5as/h) is divided by t")
            return Verdict(False, f"for Ψ={psi / 1e9:.0f}B t={t} p={p} d={d} ZeRO-{z} b={b} recompute={rc}: "
                           f"{got / 1e9:.2f} GB, expected {want / 1e9:.2f} GB", hint)
    return Verdict(True, f"all {len(CASES)} layouts within 1% of the reference")
