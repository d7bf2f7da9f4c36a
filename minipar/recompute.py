"""Activation recompute (gradient checkpointing): trade FLOPs for activation memory.

Backward needs the forward's intermediate tensors. Keeping them costs, per transformer
layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", Sec. 4.1, 16-bit activations, no parallelism):

    s·b·h·(34 + 5·a·s/h)  bytes     (s sequence, b batch, h hidden, a heads)

* full recompute (Chen et al. 2016): keep only each block's input (2sbh bytes) and run
  the block's forward again during backward: one extra forward, about +33% FLOPs.
* selective recompute (Korthikanti et al. Sec. 5): recompute only the attention core
  softmax(QKᵀ)V. It owns the 5·a·s²·b term (the s² scores, softmax, its dropout mask)
  but few FLOPs, so most of the memory goes for a few percent of compute.

Both use torch's non-reentrant `checkpoint`, which reruns the forward with the same
parameters, so gradients are bit-for-bit those of the plain model. `layers` picks
which blocks recompute (e.g. every other one), per block. Measure the effect with
`minipar.activations.SavedActivations` (a checkpoint keeps its block's input itself, outside
the meter's view: add 2sbh bytes per fully recomputed layer in 16-bit).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .model import GPT

__all__ = ["MODES", "apply_recompute"]

MODES = ("full", "selective")


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():  # inference: nothing is saved anyway
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def apply_recompute(model: GPT, mode: str = "full", layers=None) -> GPT:
    """Make `model`'s blocks recompute in backward, in place. mode: "full" (the whole
    block) or "selective" (the attention core only); layers: block indices (default all)."""
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {MODES}, got {mode!r}")
    # a pipeline stage keeps its blocks in a dict keyed by their global index
    blocks = (
        list(model.blocks.values()) if isinstance(model.blocks, torch.nn.ModuleDict) else list(model.blocks)
    )
    layers = range(len(blocks)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"recompute layers {bad} are out of range: the model has {len(blocks)} blocks")
    for i in layers:
        blk = blocks[i]
        if mode == "full":
            # The module's own __call__ (and so its hooks, e.g. ZeRO-3's gather) stays outside
            # the checkpoint; only the forward body is rerun.
            blk.forward = _checkpointed(blk.forward)
        else:
            blk.attn.attn_fn = _checkpointed(blk.attn.attn_fn)
    return model
