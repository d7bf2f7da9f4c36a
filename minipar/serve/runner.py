"""The model runner: one rank's piece of the model, its paged KV cache, and one step's forward.

The piece is `compose.ComposedStage`, the same cut of the reference GPT that training uses:
the layers of this rank's pipeline stage (stage 0 adds the embeddings, the last stage ln_f and
the head), split over tp (Megatron: a/t heads and 4h/t MLP columns per rank, vocab-parallel
embedding and head), with each MoE block keeping only this rank's E/ep experts. Inference MoE
is dropless (capacity factor inf), so a token's experts never depend on its batch-mates.

One step runs every sequence of a scheduler `Step` through the stage at once, packed as one
[N, h] matrix of their new tokens (N = prompt lengths of the prefills + one per decode).
Everything but attention is per token, so it runs on the packed matrix: Orca's *selective
batching* (Sec. 3.3). Attention is per sequence, through its block table:

    write   k_pool[slot(p)], v_pool[slot(p)] = k_p, v_p     for the step's positions p
    read    K = k_pool[slot(0..end)],  V likewise            (gather along the block table)
    attend  softmax(q K^T / sqrt(d)) V, causal for a prefill (one query sees every key on a decode)

Each layer owns one pool per K and V of [num_blocks * block_size, a/t, d] slots; the tables
come from the scheduler, so every layer of every stage indexes its pool the same way.

Communication per layer and step: tp's two all-reduces of N*h values (after attention's and
the MLP's row-parallel projections, the g of Megatron), and under ep one all-to-all there and
back per MoE block (the dispatcher `ep.expert_parallel` installs). The greedy token is the argmax over the
vocab-parallel logits (`tp_generate.vocab_parallel_argmax`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compose import ComposedStage, ParallelConfig
from ..ep import expert_parallel
from ..mesh import Mesh
from ..model import GPT, GPTConfig
from ..moe import moe_layers
from ..pp.stage import part_ranges
from ..runtime import device
from ..tp_generate import vocab_parallel_argmax
from .blocks import slots_of
from .scheduler import Step

__all__ = ["StageRunner", "paged_attention"]


def paged_attention(attn, x, spans, k_pool, v_pool):
    """Attention of the packed tokens x [N, h]; `spans` holds, per sequence, its rows (lo, hi),
    the slots of its new positions and the slots of all its positions so far (both tensors).
    Works on the reference `Attention` and on tp's `ParallelAttention` (both have q, k, v, proj)."""
    d = attn.head_dim
    q, k, v = (lin(x).unflatten(-1, (-1, d)) for lin in (attn.q, attn.k, attn.v))  # [N, a/t, d]
    out = []
    for lo, hi, new, seen in spans:
        k_pool[new], v_pool[new] = k[lo:hi], v[lo:hi]
        qs, ks, vs = (
            t.transpose(0, 1)[None] for t in (q[lo:hi], k_pool[seen], v_pool[seen])
        )  # [1, a/t, ., d]
        # a prefill starts at position 0, so the causal mask is the usual lower triangle;
        # a decode is one query that may see every cached key
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=hi - lo > 1)
        out.append(y[0].transpose(0, 1).flatten(1))
    y = torch.cat(out) if out else x.new_zeros(0, q.shape[1] * d)
    return attn.proj(y)  # row-parallel under tp: partial sums, then g (all-reduce)


class StageRunner:
    """This rank's stage of one replica (call inside `launch`, after building the Mesh)."""

    def __init__(
        self, cfg: GPTConfig, pc: ParallelConfig, mesh: Mesh, seed: int, num_blocks: int, block_size: int
    ):
        ref = GPT(cfg, seed)
        if cfg.experts:
            if pc.ep > 1:
                expert_parallel(ref, mesh, groups=1)
            for layer in moe_layers(ref):
                layer.groups = 1  # dropless: one group per forward, whatever its size
        s = mesh.index("pp")
        self.layers = part_ranges(cfg, pc.pp, pc.stage_layers)[s]
        self.first, self.last, self.tp = s == 0, s == pc.pp - 1, pc.tp
        self.module = ComposedStage(ref, self.layers, self.first, self.last, pc, mesh).to(device()).eval()
        self.cfg, self.block_size, self.dev = cfg, block_size, device()
        # ep ranks exchange tokens inside every MoE block, so they run a step even when their own is empty
        self.lockstep = pc.ep > 1 and any(cfg.is_moe(i) for i in self.layers)
        shape = (num_blocks * block_size, cfg.heads // pc.tp, cfg.head_dim)
        self.k_pools = {i: torch.zeros(shape, device=self.dev) for i in self.layers}
        self.v_pools = {i: torch.zeros(shape, device=self.dev) for i in self.layers}

    def must_run(self, step: Step | None) -> bool:
        return bool(step) or (step is not None and self.lockstep)

    def _spans(self, step: Step) -> list:
        out, lo, bs = [], 0, self.block_size
        for w in step.works:
            new = torch.tensor(slots_of(w.table, w.start, w.start + w.tokens, bs), device=self.dev)
            seen = torch.tensor(slots_of(w.table, 0, w.start + w.tokens, bs), device=self.dev)
            out.append((lo, lo + w.tokens, new, seen))
            lo += w.tokens
        return out

    @torch.no_grad()
    def embed(self, step: Step, ids: list[int]) -> torch.Tensor:
        """First stage: [N, h] embeddings of the step's new tokens at their positions."""
        pos = [p for w in step.works for p in range(w.start, w.start + w.tokens)]
        ids_t, pos_t = (torch.tensor(v, dtype=torch.long, device=self.dev) for v in (ids, pos))
        return self.module.wte(ids_t) + self.module.wpe(pos_t)

    @torch.no_grad()
    def forward(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """This stage's blocks on the packed hidden states x [N, h]."""
        spans = self._spans(step)
        for i in self.layers:
            blk = self.module.blocks[str(i)]
            x = x + paged_attention(blk.attn, blk.ln1(x), spans, self.k_pools[i], self.v_pools[i])
            x = x + blk.mlp(blk.ln2(x))
        return x

    @torch.no_grad()
    def sample(self, step: Step, x: torch.Tensor) -> list[int]:
        """Last stage: the greedy token of each sequence, from its last new position."""
        last = torch.tensor([w.tokens for w in step.works], device=self.dev).cumsum(0) - 1
        logits = self.module.head(self.module.ln_f(x[last]))  # [B, V/t]
        tokens = vocab_parallel_argmax(logits, "tp") if self.tp > 1 else logits.argmax(-1)
        return tokens.tolist()
