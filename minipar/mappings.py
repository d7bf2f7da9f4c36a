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
with its axis and bytes; use them as `comm.f`, `comm.g`, ... (re-exported there).
"""
from __future__ import annotations

import torch

from .comm import all_gather, all_reduce, all_to_all, local_rank, reduce_scatter, size

__all__ = ["f", "g", "copy_to_parallel_region", "reduce_from_parallel_region", "gather_along",
           "reduce_scatter_along", "split_along", "all_to_all_autograd"]


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
