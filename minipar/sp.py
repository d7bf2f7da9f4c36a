"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", Sec. 4.2.2), and the cost formulas of TP and TP+SP.

Tensor parallelism (see `minipar.tp`) splits the attention and MLP GEMMs, but the
LayerNorms and residual adds between them run on the full [b, s, h] activation on
every one of the t ranks. SP splits those regions along the sequence instead:

    [b, s/t, h] --LN--> all-gather(s) --> column GEMMs | local | row GEMM --> reduce-scatter(s) --> [b, s/t, h]
                  g_sp (bwd: reduce-scatter)                     gbar_sp (bwd: all-gather)

An all-reduce is a reduce-scatter followed by an all-gather, so replacing each of
TP's all-reduces by one of each moves the same bytes; what changes is that
nothing of size sbh is stored whole any more.

One more trick makes the saving complete: the all-gathered input of the column
GEMMs is needed again in backward (dW = dY^T X). Storing it would keep sbh bytes;
Megatron stores the s/t shard and all-gathers it again in backward, overlapped
with the input-gradient GEMM (`regather=True` here, the default: `mappings.gather_linear`).
With `regather=False` the entry is plainly `mappings.gather_along` and autograd keeps
the gathered tensor. The re-gather costs one all-gather per column region:

    per layer, per micro-batch, M = b*s*h*bytes:
      TP:      4 all-reduces of M          (2 forward: g after attention and MLP;
                                            2 backward: f before them)
      TP+SP:   4 reduce-scatters of M, 4 + 2*regather all-gathers of M

Activation bytes saved per layer, measured by `minipar.activations.SavedActivations`.
The paper's formulas (2-byte activations, 1-byte dropout masks, a heads):
      TP:      sbh (10 + 24/t + 5as/(ht))        TP+SP:  sbh (34/t + 5as/(ht))
Adapted to this model (fp32 = 4 bytes, no dropout, fused SDPA): see `activation_bytes`.
"""

from __future__ import annotations

import torch

from . import comm, trace
from .activations import SavedActivations
from .mappings import SEQ
from .model import GPT
from .runtime import device
from .tp import ParallelBlock

__all__ = ["activation_bytes", "korthikanti_bytes", "comm_per_layer", "comm_per_step", "measure_layer"]


def korthikanti_bytes(s, b, h, a, t, sp=False) -> float:
    """The paper's per-layer activation bytes (Sec. 4.2, eqs. 2-4: 2-byte activations, dropout, unfused attention)."""
    return s * b * h * ((34 / t if sp else 10 + 24 / t) + 5 * a * s / (h * t))


def activation_bytes(s, b, h, a, t, sp=False, regather=True, nbytes=4) -> float:
    """Per-layer bytes saved for backward by *this* model, term by term (Korthikanti's
    table, with B = nbytes per element and every s-sized region divided by t where it is split):

        LayerNorm 1, 2 inputs            2 * Bsbh            (/t under SP)
        LayerNorm mean and rstd          2 * 2Bsb            (/t under SP)   not in the paper: O(sb)
        attention, MLP GEMM inputs       2 * Bsbh            (/t under SP with regather)
        q, k, v                          3 * Bsbh / t
        SDPA output = projection input   Bsbh / t            SDPA writes [b, s, a, d]: one storage
        SDPA log-sum-exp                 B a s b / t         replaces the paper's 5as^2b: no s x s matrix
        GELU input, output (4h wide)     2 * 4Bsbh / t
        dropout masks                    0                   no dropout (the paper's 2sbh + as^2b)

    TP: sbh(4B + 12B/t) + sb(4B + aB/t);   TP+SP (regather): sbh 16B/t + sb(4B + aB)/t.
    With B = 4 the sbh terms are sbh(16 + 48/t) and sbh 64/t: exactly twice the paper's
    10 + 24/t and 34/t once its two 1-byte dropout masks (2sbh) are taken out."""
    B = nbytes
    split_norm = t if sp else 1
    split_in = t if (sp and regather) else 1
    norms = 2 * B * s * b * h / split_norm + 2 * 2 * B * s * b / split_norm
    gemm_inputs = 2 * B * s * b * h / split_in
    attention = (3 + 1) * B * s * b * h / t + B * a * s * b / t
    mlp = 2 * 4 * B * s * b * h / t
    return norms + gemm_inputs + attention + mlp


def comm_per_layer(b, s, h, t, sp=False, regather=True, nbytes=4) -> dict:
    """{op: (count, payload bytes)} of one transformer layer's forward + backward on one
    rank, in trace's byte convention (all_reduce: the tensor; all_gather: its output;
    reduce_scatter: its input). Empty when t = 1: a group of one communicates nothing."""
    if t == 1:
        return {}
    M = b * s * h * nbytes
    if not sp:
        return {"all_reduce": (4, 4 * M)}
    gathers = 4 + (2 if regather else 0)
    return {"all_gather": (gathers, gathers * M), "reduce_scatter": (4, 4 * M)}


def measure_layer(cfg, batch_size: int, group="tp", sequence_parallel=False, regather=True, seed=0) -> dict:
    """Run one block's forward and backward on this rank (inside `launch`, with a Mesh
    holding `group`) and measure it: {"activation_bytes": saved for backward, "comm" and
    "comm_forward": {op: (count, payload bytes)} from the trace, for the whole step and for
    the forward alone, "events": the traced events, "saved": what was saved}."""
    block = ParallelBlock(GPT(cfg, seed).blocks[0], group, sequence_parallel, regather).to(device())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, cfg.seq, cfg.hidden, generator=gen).to(device())
    if sequence_parallel:
        x = x.chunk(comm.size(group), SEQ)[comm.local_rank(group)].clone()  # its own storage
    x.requires_grad_(True)  # as inside a model: the layer's input gradient is computed, and its f all-reduced
    trace.reset()
    with SavedActivations(block) as meter:
        with trace.span("F"):
            y = block(x)
    n_forward = len(trace.events())
    with trace.span("B"):
        y.backward(torch.ones_like(y))
    evs = trace.events()

    def tally(events):
        counts: dict = {}
        for e in events:
            if e.cat == "comm":
                c, b = counts.get(e.name, (0, 0))
                counts[e.name] = (c + 1, b + e.bytes)
        return counts

    return {
        "activation_bytes": meter.bytes,
        "comm": tally(evs),
        "comm_forward": tally(evs[:n_forward]),
        "events": evs,
        "saved": meter.tensors,
    }


def comm_per_step(cfg, batch_size: int, t: int, sp=False, regather=True, nbytes=4) -> dict:
    """{op: (count, payload bytes)} of one whole training step of `minipar.tp.TPGPT` on one rank:
    L layers, plus the vocab-parallel embedding (g, or under SP a reduce-scatter), the head's
    entry (f, or SP's all-gather), the cross-entropy's 3 all-reduces of one float per token,
    and under SP one all-reduce of the replicated parameters' partial gradients."""
    if t == 1:
        return {}
    b, s, h, L = batch_size, cfg.seq, cfg.hidden, cfg.layers
    M, tokens = b * s * h * nbytes, b * s * nbytes
    out = {op: (L * c, L * n) for op, (c, n) in comm_per_layer(b, s, h, t, sp, regather, nbytes).items()}

    def add(op, count, payload):
        c, n = out.get(op, (0, 0))
        out[op] = (c + count, n + count * payload)

    add("all_reduce", 3, tokens)  # cross-entropy: max, target logit, sum of exps
    if not sp:
        add("all_reduce", 2, M)  # embedding's g (fwd), head's f (bwd)
    else:
        add("reduce_scatter", 2, M)  # embedding (fwd), head's input gradient (bwd)
        add("all_gather", 2 + regather, M)  # embedding (bwd), head (fwd, + regather in bwd)
        add("all_reduce", 1, (s * h + 6 * L * h + 2 * h) * nbytes)  # wpe, LayerNorms, row biases
    return out
