"""Context parallelism, DeepSpeed-Ulysses (Jacobs et al. 2023): trade sequence shards for head shards.

An all-to-all turns sequence-sharded Q, K, V [b, h, N/cp, d] into head-sharded
[b, h/cp, N, d]; each rank runs ordinary attention on its heads over the whole sequence,
and one more all-to-all turns the output back. 4 all-to-alls per layer forward (and 4
backward), each sending b·(N/cp)·h·d elements per rank. Needs h % cp == 0 (and
h_kv % cp == 0 under grouped-query attention).

Against ring attention (`minipar/cp.py`): Ulysses moves Q, K, V and O once each way instead of
passing KV blocks around a ring, so its bytes per rank fall as 1/cp while the ring's stay flat;
but cp cannot exceed the head count, and the attention core is untouched (any kernel works).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import comm, mappings, trace

__all__ = ["ulysses_attention", "ulysses_bytes"]


def _seq_to_heads(x, group):
    """[b, h, N/cp, d] -> [b, h/cp, N, d]: send head group j to rank j, receive every rank's tokens."""
    n = comm.size(group)
    x = mappings.all_to_all_autograd(
        rearrange(x, "b (n hh) s d -> n b hh s d", n=n).contiguous(), group=group
    )
    return rearrange(x, "n b hh s d -> b hh (n s) d")


def _heads_to_seq(y, group):
    """[b, h/cp, N, d] -> [b, h, N/cp, d]: the inverse all-to-all."""
    n = comm.size(group)
    y = mappings.all_to_all_autograd(
        rearrange(y, "b hh (n s) d -> n b hh s d", n=n).contiguous(), group=group
    )
    return rearrange(y, "n b hh s d -> b (n hh) s d")


def ulysses_attention(q, k, v, causal: bool = True, group=None) -> torch.Tensor:
    """Attention over the full sequence for h/cp heads per rank, between two all-to-alls.
    q, k, v: local contiguous shards [b, h, N/cp, d]; returns the local output shard; differentiable."""
    n, h, h_kv = comm.size(group), q.shape[1], k.shape[1]
    if h % n:
        raise ValueError(
            f"Ulysses gives each of the {n} ranks h/cp heads, but h={h} is not divisible by cp={n}; "
            f"use a head count divisible by {n}, or ring attention"
        )
    if h_kv % n:
        raise ValueError(
            f"grouped-query attention with {h_kv} KV heads cannot be split over cp={n} ranks; repeat "
            f"the KV heads (k.repeat_interleave({h // h_kv}, dim=1)) or use ring attention"
        )
    q, k, v = (_seq_to_heads(t, group) for t in (q, k, v))
    with trace.span("attn", flops=4 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h_kv != h)
    return _heads_to_seq(y, group)


def ulysses_bytes(b, h, seq, d, cp, elem=4, h_kv=None) -> dict:
    """Payload each rank sends per layer: 4 all-to-alls (Q, K, V, O) of b·(N/cp)·h·d each way
    (K and V carry h_kv heads under grouped-query attention)."""
    h_kv = h if h_kv is None else h_kv
    each = b * (seq // cp) * d * elem if cp > 1 else 0
    return {"forward": (2 * h + 2 * h_kv) * each, "backward": (2 * h + 2 * h_kv) * each}
