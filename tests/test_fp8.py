"""FP8 simulation (minipar.fp8): scaled casts, delayed vs current scaling, the FP8 linear."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minipar import fp8
from minipar.model import GPT, GPTConfig

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
    assert d.scales == [256, 256, 4, 4, 256]  # the 100 shows up one step late and stays for the history's length
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
