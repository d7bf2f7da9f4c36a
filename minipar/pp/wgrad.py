"""The I/W split: a weight-gradient store for deferred weight GEMMs (DualPipe's WeightGradStore).

A linear layer y = x Wᵀ + b has two backward GEMMs (Zero Bubble, Qi et al. 2024, Sec. 2):
    I:  dx = dy W            (the previous stage waits for this)
    W:  dW = dyᵀ x           (nobody waits for this)
While a `WeightGradStore.defer(key)` block is open, every linear layer of a stage computes
dx (and its cheap bias gradient) as usual but, instead of dW, queues a closure
`dW += dyᵀ x` under `key`; `flush(key)` runs them later. So an I action costs the
input-gradient GEMMs and a W action the weight GEMMs: together exactly one backward.
LayerNorm and embedding weights (elementwise, cheap) get their gradients in I.
Outside `defer`, the layers are ordinary linear layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WeightGradStore", "install"]


class WeightGradStore:
    def __init__(self):
        self.queue = None  # closures of the open defer() block, else None
        self.pending: dict = {}  # key -> closures waiting for their W
        # Whether the next forward's linear layers go through the store's Function. A forward
        # whose backward will be a plain B (DualPipe runs most of its backwards whole) keeps
        # torch's own F.linear, and so autograd's C++ backward instead of a Python one.
        self.record = True

    @contextmanager
    def defer(self, key):
        self.queue = []
        try:
            yield
        finally:
            self.pending[key], self.queue = self.queue, None

    def flush(self, key) -> None:
        for fn in self.pending.pop(key):
            fn()

    def __len__(self) -> int:
        return len(self.pending)


def _accumulate(w: torch.Tensor, g: torch.Tensor) -> None:
    w.grad = g if w.grad is None else w.grad + g


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.has_bias = store, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight
        db = dy.flatten(0, -2).sum(0) if ctx.has_bias else None
        dw = lambda: dy.flatten(0, -2).t() @ x.flatten(0, -2)
        if ctx.store.queue is None:
            return dx, dw(), db, None
        ctx.store.queue.append(lambda: _accumulate(weight, dw()))
        return dx, None, db, None


def install(module: nn.Module, store: WeightGradStore) -> list:
    """Route every nn.Linear in `module` through the store. Returns the parameters whose
    gradients I computes (everything but the linear weights)."""
    deferred = set()
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            mod.forward = lambda x, mod=mod: (
                _Linear.apply(x, mod.weight, mod.bias, store)
                if store.record
                else F.linear(x, mod.weight, mod.bias)
            )
            deferred.add(id(mod.weight))
    return [p for p in module.parameters() if id(p) not in deferred]
