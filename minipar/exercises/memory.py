"""Exercise of notebook 10: FP8 with delayed per-tensor scaling.

fp8_fake_quant(x, amax_history, fmt) -> x rounded through FP8 the way a delayed-scaling
recipe does it (Micikevicius et al. 2022; NVIDIA Transformer Engine):
    s = 2^floor(log2(max_fmt / max(amax_history)))     (1 if the history's max is 0)
    x_q = fp8(clamp(x·s, -max_fmt, max_fmt)) / s        (back in x's dtype)
fmt is "e4m3" (max 448) or "e5m2" (max 57344). The scale comes from the *history*, not
from x: a value above the history's max saturates.
"""
from __future__ import annotations

import math

import torch

from . import Verdict, checker, compare


def fp8_fake_quant(x: torch.Tensor, amax_history: list, fmt: str) -> torch.Tensor:
    """Reference solution (see the module docstring)."""
    from ..fp8 import fake_quant, fp8_max
    ref = max(amax_history)
    s = 2.0 ** math.floor(math.log2(fp8_max(fmt) / ref)) if ref > 0 else 1.0
    return fake_quant(x, s, fmt)


def _cases():
    g = torch.Generator().manual_seed(11)
    act = torch.randn(64, generator=g) * 3.0
    grad = torch.randn(64, generator=g) * 2e-5
    spike = torch.randn(64, generator=g)
    spike[5] = 40.0                                      # 4x the history's max: must saturate
    big = torch.randn(64, generator=g) * 100.0
    big[7] = 5000.0
    return [("activations, e4m3, history max above the current amax", act, [float(act.abs().max()) * 2.5, 1.0], "e4m3"),
            ("gradients ~1e-5, e5m2 (unscaled they would flush to zero)", grad, [float(grad.abs().max())], "e5m2"),
            ("an outlier 4x above the history, e4m3", spike, [10.0, 3.0], "e4m3"),
            ("an outlier far above the history, e5m2", big, [300.0], "e5m2"),
            ("an all-zero history", act, [0.0], "e4m3")]


@checker("fp8_fake_quant")
def check_fp8_fake_quant(solution) -> Verdict:
    """`solution(x, amax_history, fmt)` must equal the reference on 5 cases (scaled, saturated,
    tiny gradients, zero history), element for element."""
    for label, x, hist, fmt in _cases():
        want = fp8_fake_quant(x, hist, fmt)
        got = solution(x.clone(), list(hist), fmt)
        if not isinstance(got, torch.Tensor):
            return Verdict(False, f"{label}: expected a tensor, got {type(got).__name__}",
                           "return the dequantized tensor, fp8(...).to(x.dtype) / s")
        if not torch.isfinite(got).all():
            return Verdict(False, f"{label}: the result has inf or nan",
                           "clamp x·s to ±max before the cast: values above the history's max must saturate")
        if got.shape == want.shape and torch.equal(got, torch.zeros_like(got)) and want.abs().max() > 0:
            return Verdict(False, f"{label}: every value became 0",
                           "multiply by the scale s before the cast: small values fall below FP8's smallest number")
        diff = compare(got, want, label, atol=0.0)
        if diff:
            ratio = (got.double().abs().max() / want.double().abs().max()).item() if want.abs().max() > 0 else float("nan")
            if want.abs().max() > 0 and abs(math.log2(ratio) - round(math.log2(ratio))) < 1e-9 and round(math.log2(ratio)) != 0:
                hint = "off by a power of two: divide by the same s you multiplied with, after the cast"
            else:
                hint = ("s comes from max(amax_history), not from x itself, rounded *down* to a power of two: "
                        "2 ** floor(log2(max_fmt / amax)); max_fmt is torch.finfo(torch.float8_e4m3fn).max "
                        "(or float8_e5m2); and a zero history means s = 1")
            return Verdict(False, diff, hint)
    return Verdict(True, "delayed per-tensor scaling matches on 5 cases: scaled, saturated, tiny gradients, "
                         "zero history")
