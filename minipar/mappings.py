"""Megatron-LM's communication operators as autograd functions ("mappings" in Megatron's code).

Megatron-LM (Shoeybi et al. 2019, Fig. 3) names two conjugate operators:
    f: forward identity,   backward all-reduce   (enters a parallel region)
    g: forward all-reduce, backward identity     (leaves a parallel region)
Sequence parallelism (Korthikanti et al. 2022, Sec. 4.2.2) replaces them with
    g_sp:    forward all-gather along the sequence, backward reduce-scatter
    gbar_sp: forward reduce-scatter along the sequence, backward all-gather
An all-gather followed by a reduce-scatter moves the same bytes as one
all-reduce, which is why SP costs no extra communication. Expert and Ulysses
parallelism add a differentiable all-to-all, whose backward sends gradients back
the way the tokens came.

Every one is built on `comm`'s traced collectives, so each shows up in the trace
with its axis and bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import comm
from .comm import all_gather, all_reduce, all_to_all, local_rank, reduce_scatter, size

__all__ = [
    "f",
    "g",
    "copy_to_parallel_region",
    "reduce_from_parallel_region",
    "gather_along",
    "reduce_scatter_along",
    "split_along",
    "all_to_all_autograd",
    "SEQ",
    "gather_linear",
    "sync_sequence_parallel_grads",
]


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return all_reduce(dy.contiguous().clone(), group=ctx.group), None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group=group)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def f(x: torch.Tensor, group="tp") -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce backward."""
    return _F.apply(x, group)


def g(x: torch.Tensor, group="tp") -> torch.Tensor:
    """Megatron's g: all-reduce forward, identity backward."""
    return _G.apply(x, group)


copy_to_parallel_region, reduce_from_parallel_region = f, g


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad):
        ctx.dim, ctx.group, ctx.grad = dim, group, grad
        return all_gather(x, dim=dim, group=group)

    @staticmethod
    def backward(ctx, dy):
        if ctx.grad == "reduce_scatter":
            return reduce_scatter(dy, dim=ctx.dim, group=ctx.group), None, None, None
        return _chunk(dy, ctx.dim, ctx.group), None, None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim=dim, group=group)

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy, dim=ctx.dim, group=ctx.group), None, None


class _SplitAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _chunk(x, dim, group)

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy, dim=ctx.dim, group=ctx.group), None, None


def _chunk(x, dim, group):
    n = size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} ranks")
    return x.chunk(n, dim=dim)[local_rank(group)].contiguous()


def gather_along(x, dim: int, group="tp", grad: str = "reduce_scatter"):
    """All-gather along `dim`. Backward: reduce-scatter (SP's g, the default) or plain split
    (grad="split": when every rank's copy of the output gets the same gradient)."""
    return _GatherAlong.apply(x, dim, group, grad)


def reduce_scatter_along(x, dim: int, group="tp"):
    """SP's g-bar: reduce-scatter along `dim` forward, all-gather backward."""
    return _ReduceScatterAlong.apply(x, dim, group)


def split_along(x, dim: int, group="tp"):
    """Keep this rank's chunk along `dim` forward (no communication), all-gather backward."""
    return _SplitAlong.apply(x, dim, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group=group)

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        return all_to_all(dy.contiguous(), in_splits, out_splits, group=ctx.group), None, None, None


def all_to_all_autograd(x, output_split_sizes=None, input_split_sizes=None, group=None):
    """Differentiable all_to_all_single along dim 0: backward sends the gradients back the same way."""
    return _AllToAll.apply(x, output_split_sizes, input_split_sizes, group)


# ----------------------------------------------------------------------------- sequence parallelism
SEQ = 1  # our activations are [b, s, h]; Megatron's are [s, b, h], hence its dim 0


class _GatherLinear(torch.autograd.Function):
    """All-gather x [b, s/t, h] along the sequence and apply column-parallel linears to it,
    keeping only the shard for backward (b*s*h/t elements instead of b*s*h).

    Backward all-gathers the shard again while the input gradient is computed, then
    reduce-scatters that gradient while the weight gradients are computed: Megatron's
    LinearWithGradAccumulationAndAsyncCommunication. Cost: one more all-gather of b*s*h."""

    @staticmethod
    def forward(ctx, x, group, *wb):
        full = comm.all_gather(x, dim=SEQ, group=group).contiguous()  # one copy, not one per linear
        ctx.group = group
        ctx.save_for_backward(x, *wb)
        return tuple(F.linear(full, w, b) for w, b in zip(wb[::2], wb[1::2]))

    @staticmethod
    def backward(ctx, *dys):
        shard, *wb = ctx.saved_tensors
        weights, biases = wb[::2], wb[1::2]
        gather = comm.all_gather(shard, dim=SEQ, group=ctx.group, async_op=True)
        dfull = sum(dy @ w for dy, w in zip(dys, weights))  # overlaps the all-gather
        scatter = comm.reduce_scatter(dfull, dim=SEQ, group=ctx.group, async_op=True)
        full = gather.wait().reshape(-1, shard.shape[-1])
        grads = []
        for dy, b in zip(dys, biases):  # overlaps the reduce-scatter
            dy = dy.reshape(-1, dy.shape[-1])
            grads += [dy.t() @ full, dy.sum(0) if b is not None else None]
        return (scatter.wait(), None, *grads)


def gather_linear(x, layers, group="tp") -> list:
    """SP's entry operator fused with the column-parallel `layers` that read its output.
    x: [b, s/t, h] -> one [b, s, out/t] per layer."""
    wb = [t for layer in layers for t in (layer.weight, layer.bias)]
    return list(_GatherLinear.apply(x, group, *wb))


def sync_sequence_parallel_grads(model, group="tp") -> None:
    """Sum the gradients of replicated parameters that saw only this rank's s/t tokens
    (LayerNorms, row-parallel biases, position embeddings): one coalesced all-reduce
    per step, as Megatron's finalize_model_grads does for `sequence_parallel` params.
    `model` is a module or an iterable of parameters."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    comm.all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)], group)
