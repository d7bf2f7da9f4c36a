"""Greedy generation under tensor parallelism, with a KV cache.

Decoding one token reads every weight once and does little arithmetic, so it is
bound by memory bandwidth; TP splits the weights over t devices, and each reads
2Ψ/t bytes per token (Pope et al. 2022, "Efficiently Scaling Transformer
Inference", Sec. 3). The price is 2 all-reduces of b*h elements per layer per
token (after attention and after the MLP), which are latency-bound.

The cache is split like the heads: rank i keeps K and V of its a/t heads only,
[b, a/t, s, d] per layer, so the cache shrinks by t as well. The logits stay
split over the vocabulary; the greedy token is the argmax of every rank's local
maximum (one all-gather of two numbers per sequence).

Modeled per-token latency on GPUs (the roofline, with the KV cache's bytes and each GPU's
HBM and NVLink from the planner's hardware table) is `minipar.plan.serving.token_latency`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import comm
from .tp import TPGPT

__all__ = ["generate", "vocab_parallel_argmax", "decode_latency"]

# H100 SXM: 3.35 TB/s HBM3; NVLink 4: 450 GB/s per direction; ~10 us per small NCCL all-reduce.


def vocab_parallel_argmax(logits_local, group="tp"):
    """[b, V/t] -> [b] global token ids; ties go to the lowest id, as torch.argmax does."""
    val, idx = logits_local.max(-1)
    idx = idx + comm.local_rank(group) * logits_local.shape[-1]
    both = comm.all_gather(
        torch.stack([val, idx.to(val.dtype)], -1)[:, None], dim=1, group=group
    )  # [b, t, 2]
    best = both[..., 0].argmax(-1)  # first rank holding the maximum = lowest id among ties
    return both[torch.arange(len(best), device=best.device), best, 1].long()


def _attend(attn, x, cache: dict):
    """One attention call that appends this step's K, V to the cache and attends to all of it."""
    q, k, v = (attn.heads(layer(x)) for layer in (attn.q, attn.k, attn.v))  # f is identity forward
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    cache["k"], cache["v"] = k, v
    # The prefill (empty cache) is causal; a single new query may see every cached key.
    y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return attn.proj(y.transpose(1, 2).flatten(2))  # row-parallel: partial sums, then g


def _forward_cached(model: TPGPT, idx, start: int, caches: list):
    x = model.wte(idx) + model.wpe(torch.arange(start, start + idx.shape[1], device=idx.device))
    for blk, cache in zip(model.blocks, caches):
        x = x + _attend(blk.attn, blk.ln1(x), cache)
        x = x + blk.mlp(blk.ln2(x))
    return model.head(model.ln_f(x[:, -1]))  # [b, V/t]: only the last position is needed


@torch.no_grad()
def generate(model: TPGPT, idx, new_tokens: int, timings: list | None = None):
    """Greedy decoding, token-identical to `GPT.generate` while the text fits in cfg.seq.
    If `timings` is a list, the seconds of each decode step (not the prefill) are appended."""
    if model.sp:
        raise ValueError(
            "build the TPGPT with sequence_parallel=False for decoding: "
            "a single new token has no sequence to split"
        )
    if idx.shape[1] + new_tokens > model.cfg.seq:
        raise ValueError(
            f"prompt ({idx.shape[1]}) + new_tokens ({new_tokens}) exceeds cfg.seq={model.cfg.seq}: the "
            f"positions run out (GPT.generate would slide its window); use fewer tokens or a larger seq"
        )
    caches = [{} for _ in model.blocks]
    logits = _forward_cached(model, idx, 0, caches)
    for i in range(new_tokens):
        nxt = vocab_parallel_argmax(logits, model.group)[:, None]
        idx = torch.cat([idx, nxt], 1)
        if i + 1 < new_tokens:
            t0 = time.perf_counter()
            logits = _forward_cached(model, nxt, idx.shape[1] - 1, caches)
            if timings is not None:
                timings.append(time.perf_counter() - t0)
    return idx


def decode_latency(model: TPGPT, idx, new_tokens: int, repeats: int = 3) -> float:
    """Median seconds per decoded token on this rank (call on every rank of the group)."""
    times: list = []
    for _ in range(repeats):
        comm.barrier(model.group)
        generate(model, idx, new_tokens, times)
    return float(torch.tensor(times).median())
