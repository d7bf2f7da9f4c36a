"""Measure activation memory: the bytes autograd keeps alive for the backward pass.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Sec. 4) count the activations a layer stores for backward; this meter
measures the same thing on a real run with `torch.autograd.graph.saved_tensors_hooks`:
every tensor an op saves passes through `pack`, and we add up its storage.

    with SavedActivations(model) as m:
        loss = model(x, y)[1]
    m.bytes    # what backward will read

Three rules make the number mean "activations":
* each storage counts once (q, k and v linears all save the same LayerNorm output;
  a view saved by the next op shares its base's storage);
* parameters are not activations (a linear saves its weight too), so the storages
  of `exclude`'s parameters are skipped;
* the whole storage counts, since that is what stays allocated.
Nested `saved_tensors_hooks` replace each other, so nothing else inside the block
may install its own.
"""

from __future__ import annotations

import torch

__all__ = ["SavedActivations"]


class SavedActivations:
    """Context manager: `.bytes` = unique storage bytes saved for backward inside the block;
    `.tensors` = [(shape, dtype, bytes)] in save order, for inspection."""

    def __init__(self, *exclude):
        self.skip = set()
        for obj in exclude:  # modules, parameters, or tensors
            params = obj.parameters() if isinstance(obj, torch.nn.Module) else [obj]
            self.skip.update(p.untyped_storage().data_ptr() for p in params)
        self.seen: dict[int, int] = {}
        self.tensors: list = []
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen[ptr] = st.nbytes()
            self.tensors.append((tuple(t.shape), t.dtype, st.nbytes()))
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
