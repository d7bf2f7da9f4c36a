"""Mixed precision: 16-bit compute, fp32 master weights, dynamic loss scaling.

Micikevicius et al. 2018, "Mixed Precision Training" (ICLR):
* Forward and backward run in a 16-bit `param_dtype` (bf16 or fp16): half the bytes of
  parameters, gradients and activations, and tensor-core FLOPs on a GPU.
* The optimizer updates an fp32 *master* copy of the weights: an update lr·Δ is often
  below half a 16-bit ulp of the weight and would round away. Adam then holds
  K = 4 (master) + 4 (momentum) + 4 (variance) = 12 bytes per parameter: the ZeRO paper's
  K, so model states cost (2 + 2 + 12)Ψ = 16Ψ bytes.
* fp16 has 5 exponent bits: gradients below 2^-24 flush to zero. Scale the loss by S
  before backward (gradients scale with it), unscale by 1/S before the step. Dynamic
  scaling: if any gradient on any rank is inf/NaN, skip the step and halve S; after
  `growth_interval` clean steps, double it. bf16 keeps fp32's 8 exponent bits and needs
  no scaling.
* `reduce_dtype` is the dtype gradients travel in: fp32 for accuracy, 16-bit for half
  the traffic (FSDP2's MixedPrecisionPolicy uses the same two names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .runtime import device

__all__ = ["MixedPrecision", "DynamicLossScaler", "DTYPES"]

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype(d):
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[d]


@dataclass(frozen=True)
class MixedPrecision:
    """param_dtype: compute dtype of parameters and activations; reduce_dtype: dtype of
    gradient communication (None = param_dtype); loss_scale: "dynamic", a fixed float,
    or None. fp16 without loss scaling is refused: small gradients would vanish."""

    param_dtype: torch.dtype | str = torch.float32
    reduce_dtype: torch.dtype | str | None = None
    loss_scale: str | float | None = None

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype))
        object.__setattr__(self, "reduce_dtype", _dtype(self.reduce_dtype) or self.param_dtype)
        if self.param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"param_dtype must be fp32, bf16 or fp16, got {self.param_dtype}")
        if self.param_dtype == torch.float16 and self.loss_scale is None:
            raise ValueError(
                "fp16 compute needs loss scaling: pass loss_scale='dynamic' (or a number), "
                "or use param_dtype='bf16', which does not"
            )
        if isinstance(self.loss_scale, str) and self.loss_scale != "dynamic":
            raise ValueError(f"loss_scale must be 'dynamic', a number or None, got {self.loss_scale!r}")

    def make_scaler(self, group=None) -> "DynamicLossScaler | None":
        if self.loss_scale is None:
            return None
        if self.loss_scale == "dynamic":
            return DynamicLossScaler(group=group)
        return DynamicLossScaler(init_scale=float(self.loss_scale), growth_interval=0, group=group)


class DynamicLossScaler:
    """scale(loss) before backward; unscale_(grads) -> found_inf (agreed by every rank of
    `group`); update(found_inf) after, which halves S on overflow and doubles it after
    `growth_interval` clean steps (0: never grow). `history` keeps (scale, skipped) per step."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        group=None,
    ):
        self.scale_value, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.group = growth_interval, group
        self.clean_steps, self.history = 0, []

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide `grads` by S in place; True if any rank saw an inf/NaN."""
        bad = torch.zeros(1, device=grads[0].device if grads else device())
        for g in grads:
            g.mul_(1.0 / self.scale_value)
            bad += (~torch.isfinite(g)).any().float()
        # Every rank must agree to skip: one rank stepping alone would fork the replicas.
        comm.all_reduce(bad, op="max", group=self.group)
        return bool(bad.item() > 0)

    def update(self, found_inf: bool) -> None:
        self.history.append((self.scale_value, found_inf))
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.growth_interval and self.clean_steps % self.growth_interval == 0:
            self.scale_value *= self.growth_factor
