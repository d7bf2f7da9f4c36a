"""The optimizer over this rank's flat shards, and ZeRO-Offload: its state on the host.

ZeRO (stages 1-3) steps AdamW on flat shards of the parameters. Where the fp32 master
weights and Adam's moments (K·Ψ/N bytes) live is a separate choice:

* on the compute device (default). With fp32 compute the shard *is* the master weight,
  so K = 8 (two moments); with 16-bit compute a separate fp32 master is kept, K = 12.
* on the host: ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing
  Billion-Scale Model Training", Sec. 4). The device keeps only 16-bit parameters and
  gradients; per step it sends the gradient shard device->host (G·Ψ/N bytes), the CPU
  runs Adam, and the updated shard comes back host->device (P·Ψ/N bytes). The device's
  model states drop from (P + G + K)Ψ/N to (P + G)Ψ/N at stage 3.

The same code serves a GPU machine (device = cuda, host = cpu, pinned buffers) and
the laptop (both are the CPU: the copies are real but stay in the same memory, and
the bookkeeping below still tells device bytes from host bytes).
"""
from __future__ import annotations

import torch

from .model import make_optimizer
from .runtime import device as compute_device

__all__ = ["ShardOptimizer", "host_device"]


def host_device() -> torch.device:
    return torch.device("cpu")


class ShardOptimizer:
    """AdamW (minipar's `make_optimizer`) over `shards` (the flat shards this rank owns,
    in the compute dtype). step(grads) updates the shards in place."""

    def __init__(self, shards: list[torch.Tensor], offload: bool = False, **optim):
        self.shards, self.offload = shards, offload
        self.state_device = host_device() if offload else compute_device()
        pin = offload and compute_device().type == "cuda"  # page-locked: fast async host->device
        self.masters = []
        for s in shards:
            if not offload and s.dtype == torch.float32:
                m = s  # fp32 on the device: the shard is its own master, stepped in place
            else:
                m = torch.empty(s.shape, dtype=torch.float32, device=self.state_device, pin_memory=pin)
                m.copy_(s)
            self.masters.append(m.requires_grad_())
        self.optimizer = make_optimizer(self.masters, **optim)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        for m, g in zip(self.masters, grads):
            # device->host for offload (blocking: the CPU step reads it next); a cast for 16-bit
            # gradients; no copy at all for fp32 on the device
            m.grad = g.to(device=m.device, dtype=torch.float32)
        self.optimizer.step()
        for s, m in zip(self.shards, self.masters):
            m.grad = None
            if m is not s:
                s.copy_(m, non_blocking=True)  # host->device, rounding to the compute dtype

    def state_bytes(self) -> dict:
        """Bytes of optimizer state: masters that are not the shards themselves, and the
        moments; AdamW's scalar `step` counters apart. `where` says host or device."""
        from .dp import held_bytes
        own = [m for m, s in zip(self.masters, self.shards) if m is not s]
        st = [v for d in self.optimizer.state.values() for v in d.values() if torch.is_tensor(v)]
        return dict(optimizer=held_bytes(own + [v for v in st if v.dim() > 0]),
                    optimizer_scalars=sum(v.numel() * v.element_size() for v in st if v.dim() == 0),
                    where="host" if self.offload else "device")
