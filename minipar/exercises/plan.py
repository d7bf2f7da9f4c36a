"""Exercise of notebook 09: the memory of one GPU in a 3D-parallel layout.

`memory_per_gpu(psi, layers, hidden, heads, seq, micro_batch, tp, pp, dp, zero_stage, recompute)`:
bytes on the first pipeline stage's GPU under 1F1B with TP + SP. Model states of its Ψ/(t·p)
parameters by ZeRO stage over d ranks (ZeRO 2020), plus activations: l/p layers × p micro-batches
in flight × Korthikanti's per-layer bytes. Checked within 1% on fixed and randomized layouts.
"""

from __future__ import annotations

from ..plan import activation_bytes_per_layer, model_state_bytes
from . import Case, Exercise, exercise, student


def _expected(psi, layers, hidden, heads, seq, micro_batch, tp, pp, dp, zero_stage, recompute):
    states = model_state_bytes(psi / (tp * pp), dp, zero_stage)
    in_flight = pp  # 1F1B: stage 0 holds p micro-batches at its peak
    one_layer = activation_bytes_per_layer(seq, micro_batch, hidden, heads, tp, True, recompute)  # with SP
    return states + layers / pp * in_flight * one_layer


# (Ψ, l, h, a, s, b, t, p, d, ZeRO, recompute): small and large, each term dominant somewhere
CASES = [
    (7e9, 32, 4096, 32, 4096, 1, 1, 1, 8, 1, "selective"),
    (70e9, 80, 8192, 64, 4096, 1, 8, 4, 2, 1, "selective"),
    (70e9, 80, 8192, 64, 4096, 2, 4, 8, 2, 3, None),
    (175e9, 96, 12288, 96, 2048, 1, 8, 8, 16, 2, "full"),
    (13e9, 40, 5120, 40, 8192, 1, 2, 2, 16, 0, None),
]
MODELS = [(7e9, 32, 4096, 32), (13e9, 40, 5120, 40), (70e9, 80, 8192, 64), (175e9, 96, 12288, 96)]


def _name(case) -> str:
    psi, l, h, a, s, b, t, p, d, z, rc = case
    return f"Ψ={psi / 1e9:.0f}B s={s} b={b} t={t} p={p} d={d} ZeRO-{z} recompute={rc}"


def _cases(rng):
    drawn = []
    for _ in range(3):
        psi, l, h, a = rng.choice(MODELS)
        t, p = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        drawn.append(
            (
                psi,
                l,
                h,
                a,
                rng.choice([2048, 4096, 8192]),
                rng.choice([1, 2]),
                t,
                p,
                rng.choice([1, 2, 8, 32]),
                rng.randint(0, 3),
                rng.choice([None, "selective", "full"]),
            )
        )
    return [Case(_name(c), c) for c in CASES] + [
        Case("random case " + _name(c), c, random=True) for c in drawn
    ]


def _judge(case, outputs):
    got, want = outputs[0], _expected(*case.args)
    if not isinstance(got, (int, float)) or got != got:
        return (f"expected a number of bytes, got {got!r}", "return a float (bytes)")
    if abs(got / want - 1) > 0.01:
        return (
            f"{got / 1e9:.2f} GB, expected {want / 1e9:.2f} GB",
            "model states: ZeRO shards over d ranks, and TP and PP already split Ψ over t·p GPUs; activations: "
            "1F1B keeps p micro-batches of l/p layers on stage 0; with SP every term of Korthikanti's "
            "sbh(34 + 5as/h) is divided by t",
        )
    return None


def _run(solution, case):
    got = student(solution, *case.args)
    return float(got) if isinstance(got, (int, float)) and not isinstance(got, bool) else repr(got)


exercise(
    Exercise(
        name="memory_per_gpu",
        notebook="09_planner",
        function="memory_per_gpu",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(_expected,),
        deadline=10.0,
        summary="every layout within 1% of the reference",
    )
)
