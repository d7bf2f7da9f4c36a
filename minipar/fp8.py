"""FP8 training, simulated on CPU: per-tensor scaled casts to float8_e4m3fn / float8_e5m2.

Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433):
* Two formats. E4M3 (4 exponent bits, 3 mantissa bits, max 448, no inf) for weights and
  activations in the forward pass; E5M2 (max 57344) for gradients, which need range more
  than precision. Using both is the paper's "hybrid" recipe.
* FP8's range is narrow, so every tensor gets its own scale s (per-tensor scaling): the
  cast is x8 = fp8(clamp(x·s, ±max)) and the GEMM's result is divided by the scales. s is
  chosen so that the tensor's largest magnitude amax lands just below the format's max:
  s = max / (amax · 2^margin).
* Delayed scaling (NVIDIA Transformer Engine's default recipe): s comes from the largest
  amax over the last L steps (the *amax history*), which is known before the cast, so the
  GEMM need not wait for a pass over its input; the current amax is then pushed into the
  history. A value above the history's max saturates at ±max. Current scaling uses the
  tensor's own amax: exact, at the cost of one extra reduction.
* We round s down to a power of two (as early Transformer Engine did): multiplying by s
  then only shifts exponents, so scaling itself adds no rounding error and x8/s is
  exactly representable in bf16.

On a GPU the GEMM reads the FP8 bytes; here the cast is the real one (`torch.float8_*`)
and the matmul runs on the dequantized values, so the numbers are those of an FP8 GEMM
with high-precision accumulation, not its speed. As is common practice, only the
transformer blocks' linears are FP8; embeddings, LayerNorms, the head and the loss stay
in higher precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT, GPTConfig, SyntheticData, make_optimizer
from .result import TrainResult

__all__ = [
    "FORMATS",
    "fp8_max",
    "fake_quant",
    "ScaleTracker",
    "FP8Linear",
    "apply_fp8",
    "train_precision",
    "RECIPES",
]

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
RECIPES = ("delayed", "current", "none")  # "none": s = 1, the raw cast (to show what scaling buys)


def fp8_max(fmt: str) -> float:
    """The largest finite value of an FP8 format: 448 (e4m3) or 57344 (e5m2)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; use one of {list(FORMATS)}")
    return torch.finfo(FORMATS[fmt]).max


def fake_quant(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """x rounded through FP8 with scale s: fp8(clamp(x·s, ±max)) / s, in x's dtype.
    The clamp matters: an unclamped overflow becomes inf in e5m2 (torch's e4m3fn cast
    happens to saturate at 448 on CPU; the clamp makes saturation explicit everywhere)."""
    m = fp8_max(fmt)
    return (x * scale).clamp(-m, m).to(FORMATS[fmt]).to(x.dtype) / scale


class ScaleTracker:
    """The scale of one tensor (an input, a weight or an output gradient) over training.

    `quantize(x)` picks s by the recipe, fake-quantizes x, and records amax and s;
    `amaxes`/`scales` keep one entry per call (for plotting), `history` the last
    `history_len` amaxes that delayed scaling reads."""

    def __init__(self, fmt: str, recipe: str = "delayed", history_len: int = 16, margin: int = 0):
        fp8_max(fmt)  # validates fmt
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.fmt, self.recipe, self.history_len, self.margin = fmt, recipe, history_len, margin
        self.history: list[float] = []
        self.amaxes: list[float] = []
        self.scales: list[float] = []
        self.saturated = 0  # elements clamped at ±max, summed over calls
        self.underflowed = 0  # nonzero elements that became 0 in the cast, summed over calls
        self.elements = 0

    def scale_from(self, amax: float) -> float:
        """s = max / (amax · 2^margin), rounded down to a power of two (1 if amax is 0,
        and always 1 for the "none" recipe)."""
        if self.recipe == "none" or not amax > 0 or not math.isfinite(amax):
            return 1.0
        return 2.0 ** math.floor(math.log2(fp8_max(self.fmt) / (amax * 2.0**self.margin)))

    @torch.no_grad()
    def next_scale(self, x: torch.Tensor) -> float:
        amax = x.abs().max().item() if x.numel() else 0.0
        # delayed: the history's max, known before this tensor is read (first call: its own amax)
        ref = amax if self.recipe == "current" or not self.history else max(self.history)
        s = self.scale_from(ref)
        self.history = (self.history + [amax])[-self.history_len :]
        self.amaxes.append(amax)
        self.scales.append(s)
        self.saturated += int((x.abs() * s > fp8_max(self.fmt)).sum())
        return s

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q = fake_quant(x, self.next_scale(x.detach()), self.fmt)
        self.underflowed += int(((q == 0) & (x != 0)).sum())
        self.elements += x.numel()
        return q


class _Cast(torch.autograd.Function):
    """Forward: quantize with `fwd` (or pass through). Backward: quantize the incoming
    gradient with `bwd` (or pass through). The cast's own derivative is taken as 1
    (straight-through), as every FP8 recipe does."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        return fwd.quantize(x) if fwd is not None else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (ctx.bwd.quantize(g) if ctx.bwd is not None else g), None, None


class FP8Linear(nn.Module):
    """A linear layer whose GEMMs see FP8 values: the input and the weight in E4M3 in the
    forward, the output gradient in E5M2 in the backward (so both backward GEMMs,
    dX = dY·W and dW = dYᵀ·X, read FP8 operands). Shares `linear`'s parameters."""

    def __init__(self, linear: nn.Linear, recipe: str = "delayed", history_len: int = 16):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        kw = dict(recipe=recipe, history_len=history_len)
        self.input_scale = ScaleTracker("e4m3", **kw)
        self.weight_scale = ScaleTracker("e4m3", **kw)
        self.grad_scale = ScaleTracker("e5m2", **kw)

    def forward(self, x):
        x8 = _Cast.apply(x, self.input_scale, None)
        w8 = _Cast.apply(self.weight, self.weight_scale, None)
        y = F.linear(x8, w8)
        y = _Cast.apply(y, None, self.grad_scale)  # identity forward; dY -> E5M2 in backward
        return y if self.bias is None else y + self.bias


def apply_fp8(model: GPT, recipe: str = "delayed", history_len: int = 16) -> dict[str, FP8Linear]:
    """Swap every nn.Linear inside the transformer blocks for an FP8Linear, in place.
    Returns {name: FP8Linear} (to read their ScaleTrackers)."""
    swapped = {}
    for i, blk in enumerate(model.blocks):
        for name, mod in list(blk.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    fp8 = FP8Linear(child, recipe, history_len)
                    setattr(mod, child_name, fp8)
                    swapped[f"blocks.{i}.{name + '.' if name else ''}{child_name}"] = fp8
    return swapped


def train_precision(
    cfg: GPTConfig,
    mode: str = "fp32",
    steps: int = 20,
    batch_size: int = 8,
    seed: int = 0,
    recipe: str = "delayed",
    history_len: int = 16,
    **optim,
) -> TrainResult:
    """Single-device training in one numeric format; the parameters and AdamW stay fp32
    (the master weights) in every mode.

    mode: "fp32"; "bf16" (matmuls under CPU autocast in bf16); "fp8" (the blocks' linears
    through FP8Linear, the rest under bf16 autocast, as Transformer Engine runs).
    Returns {"losses", "grads" (the first step's), "params" (final), "trackers": {linear name:
    FP8Linear} (fp8 only)}. `optim`: overrides of `make_optimizer` (kind="sgd" for parity tests)."""
    if mode not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"mode must be 'fp32', 'bf16' or 'fp8', got {mode!r}")
    torch.manual_seed(seed)
    model = GPT(cfg, seed)
    linears = apply_fp8(model, recipe, history_len) if mode == "fp8" else {}
    opt = make_optimizer(model.parameters(), **optim)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    losses, grads = [], {}
    for step in range(steps):
        x, y = data.batch(step, batch_size)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            _, loss = model(x, y)
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return TrainResult(
        losses,
        first_grads=grads,
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        extra=dict(trackers=linears),
    )
