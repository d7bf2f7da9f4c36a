"""The single-device reference: a small GPT, generated data, and the training loop
that every parity test compares against.

GPT-2 shape, pre-LayerNorm:  x = x + attn(ln1(x));  x = x + mlp(ln2(x)),
causal attention through `F.scaled_dot_product_attention`, GELU MLP (4h), learned
positions, untied output head (so the vocab-parallel head and embedding shard
independently). No dropout: parity tests need determinism.

Initialization is a pure function of (seed, parameter name): `init_tensor(name,
shape, seed)` draws each tensor from its own generator. A strategy that builds
its own modules can therefore build the exact full weight of any parameter by
name and keep its slice, and it equals the reference model by construction.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "Block", "Attention", "MLP", "init_tensor", "init_gpt", "SyntheticData",
           "make_optimizer", "train_reference", "TrainResult", "OPTIM"]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 64
    seq: int = 32
    layers: int = 2
    heads: int = 4
    hidden: int = 64
    mlp_ratio: int = 4
    # Mixture of experts (see minipar.moe): 0 experts = dense MLP everywhere.
    experts: int = 0
    top_k: int = 1
    moe_every: int = 1          # every n-th block is an MoE block
    capacity_factor: float = float("inf")
    shared_expert: bool = False
    router: str = "softmax"     # or "sigmoid" (DeepSeek-V3)
    aux_alpha: float = 0.01     # Switch load-balancing loss weight (0 = off)
    z_loss: float = 0.0         # ST-MoE router z-loss weight (1e-3 in the paper)
    min_capacity: int = 0       # floor of the per-expert capacity
    moe_groups: int = 1         # token groups per batch; capacity and aux loss are per group (GShard)

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_params(self) -> int:
        """Parameters of `GPT(self)`, counted without building it (tests compare with the real count):
        embeddings (V + s)h, per block 4(h² + h) attention + LayerNorms 4h + an MLP of 2rh² + (r + 1)h
        (an MoE block: E of them, a router hE, and a shared expert if any), final LayerNorm 2h, head hV."""
        h, r = self.hidden, self.mlp_ratio
        mlp = 2 * r * h * h + (r + 1) * h
        total = (self.vocab + self.seq) * h + 2 * h + h * self.vocab
        for i in range(self.layers):
            ffn = self.experts * mlp + h * self.experts + (mlp if self.shared_expert else 0) if self.is_moe(i) else mlp
            total += 4 * (h * h + h) + 4 * h + ffn
        return total

    def is_moe(self, layer: int) -> bool:
        return self.experts > 0 and (layer + 1) % self.moe_every == 0

    def replace(self, **kw) -> "GPTConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)


def init_tensor(name: str, shape, seed: int, layers: int) -> torch.Tensor:
    """The full initial value of parameter `name`, independent of construction order.

    GPT-2 scheme: N(0, 0.02) for weights, residual projections scaled by 1/sqrt(2L),
    zero biases, LayerNorm weight 1 and bias 0."""
    leaf = name.rsplit(".", 1)[-1]
    if ".ln" in f".{name}" and (leaf == "weight"):
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_gpt(model: nn.Module, seed: int, layers: int) -> nn.Module:
    for name, p in model.named_parameters():
        p.copy_(init_tensor(name, p.shape, seed, layers))
    return model


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    """Multi-head causal self-attention. `attn_fn(q, k, v)` on [b, heads, s, d] is
    swappable, so context parallelism can plug in ring or Ulysses attention."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_fn = sdpa_causal

    def split_heads(self, x):  # [b, s, heads*d] -> [b, heads, s, d]
        b, s, _ = x.shape
        return x.view(b, s, -1, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q, k, v = (self.split_heads(lin(x)) for lin in (self.q, self.k, self.v))
        y = self.attn_fn(q, k, v)
        b, _, s, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        if cfg.is_moe(layer):
            from .moe import MoE  # optional MoE block; see minipar.moe
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

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
            logits = self(idx[:, -self.cfg.seq:])
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


def make_optimizer(params, **overrides) -> torch.optim.Optimizer:
    """AdamW with minipar's defaults; weight decay on every parameter, so a flat shard
    of parameters (ZeRO) decays exactly like the unsharded model."""
    return torch.optim.AdamW(params, **{**OPTIM, **overrides}, foreach=False)


@dataclass
class TrainResult:
    losses: list
    model: GPT
    grads: dict         # name -> gradient of the last step (before the optimizer step)


def train_reference(cfg: GPTConfig, steps: int = 5, batch_size: int = 8, seed: int = 0,
                    grad_accum: int = 1, progress: bool = False, **optim) -> TrainResult:
    """The single-device loop: `steps` AdamW steps on SyntheticData's global batches.

    With grad_accum=k the global batch is split into k micro-batches and the mean of
    their losses is the step's loss (the same number every parallel layout reports)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = GPT(cfg, seed)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    opt = make_optimizer(model.parameters(), **optim)
    losses, grads = [], {}
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
        opt.step()
    return TrainResult(losses, model, grads)
