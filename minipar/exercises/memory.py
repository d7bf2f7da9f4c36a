"""Exercise of notebook 10: FP8 with delayed per-tensor scaling.

fp8_fake_quant(x, amax_history, fmt) -> x rounded through FP8 the way a delayed-scaling
recipe does it (Micikevicius et al. 2022; NVIDIA Transformer Engine):
    s = 2^floor(log2(max_fmt / max(amax_history)))     (1 if the history's max is 0)
    x_q = fp8(clamp(x·s, -max_fmt, max_fmt)) / s        (back in x's dtype)
fmt is "e4m3" (max 448) or "e5m2" (max 57344). The scale comes from the *history*, not
from x: a value above the history's max saturates. `minipar.fp8`'s own quantizer is
disabled while the student's code runs.
"""

from __future__ import annotations

import math

import torch

from ..fp8 import ScaleTracker, fake_quant, fp8_max
from . import Case, Exercise, compare, exercise, student


def _expected(x: torch.Tensor, amax_history: list, fmt: str) -> torch.Tensor:
    ref = max(amax_history)
    s = 2.0 ** math.floor(math.log2(fp8_max(fmt) / ref)) if ref > 0 else 1.0
    return fake_quant(x, s, fmt)


def _inputs(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "act":  # history max above the current amax
        x = torch.randn(64, generator=g) * 3.0
        return x, [float(x.abs().max()) * 2.5, 1.0], "e4m3"
    if kind == "grad":  # unscaled they would flush to zero
        x = torch.randn(64, generator=g) * 2e-5
        return x, [float(x.abs().max())], "e5m2"
    if kind == "spike":  # 4x the history's max: must saturate
        x = torch.randn(64, generator=g)
        x[5] = 40.0
        return x, [10.0, 3.0], "e4m3"
    if kind == "big":
        x = torch.randn(64, generator=g) * 100.0
        x[7] = 5000.0
        return x, [300.0], "e5m2"
    if kind == "zero":
        return torch.randn(64, generator=g) * 3.0, [0.0], "e4m3"
    # "random": a random magnitude, history and format
    scale = 10.0 ** (torch.rand(1, generator=g).item() * 8 - 6)
    x = torch.randn(64, generator=g) * scale
    hist = [float(x.abs().max()) * (0.25 + 2 * torch.rand(1, generator=g).item()) for _ in range(3)]
    return x, hist, ("e4m3", "e5m2")[int(torch.randint(2, (1,), generator=g))]


LABELS = {
    "act": "activations, e4m3, history max above the current amax",
    "grad": "gradients ~1e-5, e5m2 (unscaled they would flush to zero)",
    "spike": "an outlier 4x above the history, e4m3",
    "big": "an outlier far above the history, e5m2",
    "zero": "an all-zero history",
}


def _cases(rng):
    return [Case(label, (kind, 11)) for kind, label in LABELS.items()] + [
        Case(f"random case {i + 1}", ("random", rng.randint(12, 10_000)), random=True) for i in range(2)
    ]


def _run(solution, case):
    x, hist, fmt = _inputs(*case.args)
    got = student(solution, x.clone(), list(hist), fmt)
    return got if isinstance(got, torch.Tensor) else type(got).__name__


def _judge(case, outputs):
    got = outputs[0]
    x, hist, fmt = _inputs(*case.args)
    want = _expected(x, hist, fmt)
    if not isinstance(got, torch.Tensor):
        return (f"expected a tensor, got {got}", "return the dequantized tensor, fp8(...).to(x.dtype) / s")
    if not torch.isfinite(got).all():
        return (
            "the result has inf or nan",
            "clamp x·s to ±max before the cast: values above the history's max must saturate",
        )
    if got.shape == want.shape and torch.equal(got, torch.zeros_like(got)) and want.abs().max() > 0:
        return (
            "every value became 0",
            "multiply by the scale s before the cast: small values fall below FP8's smallest number",
        )
    diff = compare(got, want, "the result", atol=0.0)
    if diff:
        ratio = (
            (got.double().abs().max() / want.double().abs().max()).item()
            if want.abs().max() > 0
            else float("nan")
        )
        if (
            want.abs().max() > 0
            and ratio > 0
            and abs(math.log2(ratio) - round(math.log2(ratio))) < 1e-9
            and round(math.log2(ratio)) != 0
        ):
            hint = "off by a power of two: divide by the same s you multiplied with, after the cast"
        else:
            hint = (
                "s comes from max(amax_history), not from x itself, rounded *down* to a power of two: "
                "2 ** floor(log2(max_fmt / amax)); max_fmt is torch.finfo(torch.float8_e4m3fn).max "
                "(or float8_e5m2); and a zero history means s = 1"
            )
        return (diff, hint)
    return None


exercise(
    Exercise(
        name="fp8_fake_quant",
        notebook="10_memory_techniques",
        function="fp8_fake_quant",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(fake_quant, ScaleTracker.scale_from, ScaleTracker.quantize, _expected),
        deadline=10.0,
        summary="delayed per-tensor scaling matches element for element: "
        "scaled, saturated, tiny gradients, zero history",
    )
)
