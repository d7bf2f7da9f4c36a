"""The single-device reference: a small GPT, generated data, and the training loop
that every parity test compares against.

GPT-2 shape, pre-LayerNorm:  x = x + attn(ln1(x));  x = x + mlp(ln2(x)),
causal attention through `F.scaled_dot_product_attention`, GELU MLP (4h), learned
positions, untied output head (so the vocab-parallel head and embedding shard
independently). No dropout: parity tests need determinism. Its config, layers and
by-name initialization are in `minipar.layers` (re-exported here); an MoE block's
feed-forward is `minipar.moe.MoE`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .layers import MLP, Attention, GPTConfig, init_gpt, init_tensor, sdpa_causal
from .moe import MoE
from .result import TrainResult

__all__ = [
    "GPTConfig",
    "GPT",
    "Block",
    "Attention",
    "MLP",
    "init_tensor",
    "init_gpt",
    "sdpa_causal",
    "SyntheticData",
    "make_optimizer",
    "train_reference",
    "TrainResult",
    "OPTIM",
]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        init_gpt(self, seed, cfg.layers)

    def embed(self, idx, pos=None):
        """`pos` overrides positions 0..s-1 (context parallelism feeds each rank its own)."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def forward(self, idx, targets=None, pos=None):
        x = self.embed(idx, pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss + self.aux_loss()

    def aux_loss(self):
        """Sum of the MoE blocks' load-balancing losses from the last forward (0 when dense)."""
        return sum((getattr(b.mlp, "aux_loss", 0.0) for b in self.blocks), torch.zeros(()))

    @torch.no_grad()
    def generate(self, idx, new_tokens: int):
        """Greedy decoding without a cache (the reference for cached/parallel generation)."""
        for _ in range(new_tokens):
            logits = self(idx[:, -self.cfg.seq :])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


class SyntheticData:
    """Token streams from a fixed random Markov chain: learnable, free, and identical on
    every rank. Each token has `branch` likely successors, so the achievable loss is
    about log(branch) nats, far below the log(vocab) of the untrained model."""

    def __init__(self, vocab: int, seq: int, seed: int = 0, branch: int = 4):
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.vocab, self.seq, self.seed = vocab, seq, seed
        self.next = torch.randint(0, vocab, (vocab, branch), generator=gen)

    def batch(self, step: int, batch_size: int):
        """The global batch of `step`: (inputs, targets), both [batch_size, seq] int64."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + step)
        tok = torch.empty(batch_size, self.seq + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, self.vocab, (batch_size,), generator=gen)
        choice = torch.randint(0, self.next.shape[1], (batch_size, self.seq), generator=gen)
        for t in range(self.seq):
            tok[:, t + 1] = self.next[tok[:, t], choice[:, t]]
        return tok[:, :-1], tok[:, 1:]


OPTIM = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_optimizer(params, kind: str = "adamw", **overrides) -> torch.optim.Optimizer:
    """AdamW with minipar's defaults; weight decay on every parameter, so a flat shard of
    parameters (ZeRO) decays exactly like the unsharded model. kind="sgd" (same lr and weight
    decay, no momentum) is for parity tests of parameters: AdamW divides by √v, so a gradient
    element near zero whose rounding differs between kernel sets moves its parameter by up to
    lr per step; SGD moves it by lr times the gradient's own (tiny) difference."""
    if kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=overrides.get("lr", OPTIM["lr"]),
            weight_decay=overrides.get("weight_decay", OPTIM["weight_decay"]),
            foreach=False,
        )
    return torch.optim.AdamW(params, **{**OPTIM, **overrides}, foreach=False)


def train_reference(
    cfg: GPTConfig,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    grad_accum: int = 1,
    progress: bool = False,
    **optim,
) -> TrainResult:
    """The single-device loop: `steps` AdamW steps on SyntheticData's global batches.

    With grad_accum=k the global batch is split into k micro-batches and the mean of
    their losses is the step's loss (the same number every parallel layout reports)."""
    torch.manual_seed(seed)
    model = GPT(cfg, seed)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    opt = make_optimizer(model.parameters(), **optim)
    losses, grads, first = [], {}, {}
    for step in tqdm(range(steps), disable=not progress, desc="reference"):
        x, y = data.batch(step, batch_size)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xm, ym in zip(x.chunk(grad_accum), y.chunk(grad_accum)):
            _, loss = model(xm, ym)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        losses.append(total)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        first = first or grads
        opt.step()
    return TrainResult(
        losses,
        first_grads=first,
        grads=grads,
        model=model,
        params={n: p.detach().clone() for n, p in model.named_parameters()},
    )
