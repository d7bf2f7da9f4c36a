"""FP8 simulation (minipar.fp8): scaled casts, delayed vs current scaling, the FP8 linear."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _parity import assert_grads_match, grad_errors, grad_scales

from minipar import fp8
from minipar.model import GPT, GPTConfig, make_optimizer, train_reference

CFG = GPTConfig(vocab=32, seq=16, layers=2, heads=2, hidden=32)


def test_fake_quant_rounds_through_the_real_format_and_saturates():
    x = torch.tensor([1.0, 0.3, -7.0, 1000.0, -1e6])
    q = fp8.fake_quant(x, 1.0, "e4m3")
    assert torch.equal(q, x.to(torch.float8_e4m3fn).float().clamp(-448, 448))
    assert q[3] == 448 and q[4] == -448
    assert torch.isfinite(fp8.fake_quant(torch.tensor([1e9]), 1.0, "e5m2")).all()  # clamped, not inf
    # a power-of-two scale only moves exponents: a tiny gradient survives instead of flushing to zero
    g = torch.tensor([3e-7, -1e-6])
    assert (fp8.fake_quant(g, 1.0, "e5m2") == 0).all()
    assert (fp8.fake_quant(g, 2.0**30, "e5m2") - g).abs().max() < 0.15 * g.abs().max()
    assert fp8.fp8_max("e4m3") == 448 and fp8.fp8_max("e5m2") == 57344
    with pytest.raises(ValueError, match="e4m3"):
        fp8.fp8_max("e3m4")


def test_delayed_scaling_reads_the_history_and_current_scaling_its_own_amax():
    d = fp8.ScaleTracker("e4m3", "delayed", history_len=2)
    c = fp8.ScaleTracker("e4m3", "current")
    for amax in (1.0, 100.0, 1.0, 1.0, 1.0):
        x = torch.tensor([amax, -amax / 3])
        d.quantize(x)
        c.quantize(x)
    # s = 2^floor(log2(448 / amax)): 256 for amax 1, 4 for amax 100
    assert c.scales == [256, 4, 256, 256, 256]
    assert d.scales == [
        256,
        256,
        4,
        4,
        256,
    ]  # the 100 shows up one step late and stays for the history's length
    assert d.saturated == 2 and c.saturated == 0  # [100, -33] cast with the old scale 256: both beyond 448
    assert d.history == [1.0, 1.0]
    assert fp8.ScaleTracker("e4m3", "none").scale_from(1e-3) == 1.0
    with pytest.raises(ValueError, match="recipe"):
        fp8.ScaleTracker("e4m3", "eager")
    with pytest.raises(ValueError, match="history_len"):
        fp8.ScaleTracker("e4m3", history_len=0)


def test_fp8_linear_runs_both_gemms_on_fp8_operands():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    f = fp8.FP8Linear(lin, recipe="current")
    x = torch.randn(4, 16, requires_grad=True)
    dy = torch.randn(4, 8) * 1e-5
    y = f(x)
    y.backward(dy)
    sx, sw, sg = f.input_scale.scales[0], f.weight_scale.scales[0], f.grad_scale.scales[0]
    x8 = fp8.fake_quant(x.detach(), sx, "e4m3")
    w8 = fp8.fake_quant(lin.weight.detach(), sw, "e4m3")
    dy8 = fp8.fake_quant(dy, sg, "e5m2")
    assert torch.allclose(y, F.linear(x8, w8, lin.bias), atol=1e-6)
    assert torch.allclose(x.grad, dy8 @ w8, atol=1e-12)
    assert torch.allclose(lin.weight.grad, dy8.T @ x8, atol=1e-12)
    assert torch.allclose(lin.bias.grad, dy.sum(0), atol=1e-12)  # the bias add stays in high precision
    assert not torch.allclose(x.grad, dy @ lin.weight.detach(), atol=1e-12)  # the casts really happened


def test_apply_fp8_swaps_the_blocks_linears_only_and_trains_like_bf16():
    model = GPT(CFG)
    swapped = fp8.apply_fp8(model)
    assert len(swapped) == 6 * CFG.layers and "blocks.0.attn.q" in swapped and "blocks.1.mlp.proj" in swapped
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, fp8.FP8Linear)
    bf16 = fp8.train_precision(CFG, "bf16", steps=6)["losses"]
    f8 = fp8.train_precision(CFG, "fp8", steps=6)["losses"]
    assert f8[-1] < f8[0] - 0.05
    assert abs(f8[-1] - bf16[-1]) < 0.02 * bf16[-1]
    with pytest.raises(ValueError, match="mode"):
        fp8.train_precision(CFG, "fp4")


# Measured on CFG (max over tensors, relative to each tensor's scale; ATEN_CPU_CAPABILITY=default and avx2):
# bf16 autocast 7.6e-3 to 8.6e-3 = 2.0 to 2.2 u with bf16's u = 2^-8, bound 16 u as for ZeRO's bf16 (test_zero.py);
# FP8 0.115 to 0.137: the backward GEMMs read dY in E5M2 (3 significant bits, u = 2^-3) and X, W in E4M3
# (u = 2^-4), so one product is off by up to u_e5m2 + u_e4m3 = 0.19 before sums average it; bound 2 u_e5m2 = 0.25.
# Unscaled FP8 (recipe "none") flushes the gradients to zero: error 1.0, which the bound refuses.
PRECISION_TOL = {"bf16": 16 * 2.0**-8, "fp8": 2 * 2.0**-3}
FORWARD_U = {"bf16": 2.0**-8, "fp8": 2.0**-4}  # the loss is a mean of values computed in these formats


def test_bf16_and_fp8_match_fp32_within_their_precision():
    """The first step's gradients against the fp32 reference's, then 3 SGD steps: the parameters are fp32
    masters, so they are off by what the gradients' error moved them (steps x lr x tol x scale, twice for
    the later steps' gradients). fp32 mode is the reference loop itself: bitwise equal."""
    steps = 3
    first = train_reference(CFG, 1, 8).grads
    ref = train_reference(CFG, steps, 8, kind="sgd")
    lr, scale = make_optimizer(ref.model.parameters(), kind="sgd").defaults["lr"], grad_scales(first)
    fp32 = fp8.train_precision(CFG, "fp32", steps=steps, kind="sgd")
    assert fp32["losses"] == ref.losses and all(
        torch.equal(fp32["first_grads"][n], g) for n, g in first.items()
    )
    for mode, tol in PRECISION_TOL.items():
        run = fp8.train_precision(CFG, mode, steps=steps, kind="sgd")
        assert_grads_match(run["first_grads"], first, tol=tol, what=mode)
        assert run["losses"] == pytest.approx(ref.losses, abs=FORWARD_U[mode] * max(ref.losses)), mode
        for n, p in ref.model.named_parameters():
            bound = 2 * steps * lr * tol * scale[n] + 1e-8
            assert (run["params"][n] - p.detach()).abs().max().item() <= bound, (mode, n)
    unscaled = fp8.train_precision(CFG, "fp8", steps=1, recipe="none")["first_grads"]
    assert max(grad_errors(unscaled, first).values()) > PRECISION_TOL["fp8"]  # what scaling buys
