"""The building blocks of minipar's GPT: its config, deterministic initialization, and the
attention and MLP layers. `minipar.model` assembles them (and the MoE layer of `minipar.moe`,
which is built from the same MLP) into the reference GPT.

Initialization is a pure function of (seed, parameter name): `init_tensor(name, shape,
seed)` draws each tensor from its own generator. A strategy that builds its own modules can
therefore build the exact full weight of any parameter by name and keep its slice, and it
equals the reference model by construction.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .validation import Problems

__all__ = ["GPTConfig", "init_tensor", "init_gpt", "sdpa_causal", "Attention", "MLP"]


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
    moe_every: int = 1  # every n-th block is an MoE block
    capacity_factor: float = float("inf")
    shared_expert: bool = False
    router: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    aux_alpha: float = 0.01  # Switch load-balancing loss weight (0 = off)
    z_loss: float = 0.0  # ST-MoE router z-loss weight (1e-3 in the paper)
    min_capacity: int = 0  # floor of the per-expert capacity
    moe_groups: int = 1  # token groups per batch; capacity and aux loss are per group (GShard)

    def __post_init__(self):
        """Every field checked at once (a ConfigError listing each problem): a model that cannot be
        built is refused here, not by a ZeroDivisionError deep inside a rank."""
        p = Problems()
        for f in (
            "vocab",
            "seq",
            "layers",
            "heads",
            "hidden",
            "mlp_ratio",
            "top_k",
            "moe_every",
            "moe_groups",
        ):
            p.integer(f, getattr(self, f), low=1)
        p.integer("experts", self.experts, low=0)
        p.integer("min_capacity", self.min_capacity, low=0)
        p.choice("router", self.router, ("softmax", "sigmoid"))
        p.number("aux_alpha", self.aux_alpha, low=0)
        p.number("z_loss", self.z_loss, low=0)
        if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
            p.add(f"capacity_factor={self.capacity_factor!r} must be > 0 (float('inf') means dropless)")
        if not p:
            p.divides("heads", self.heads, "hidden", self.hidden, "each attention head is hidden/heads wide")
            if self.experts and self.top_k > self.experts:
                p.add(
                    f"top_k={self.top_k} must be <= experts={self.experts}: each token picks distinct experts"
                )
        p.raise_if_any("GPTConfig cannot build this model")

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
            ffn = (
                self.experts * mlp + h * self.experts + (mlp if self.shared_expert else 0)
                if self.is_moe(i)
                else mlp
            )
            total += 4 * (h * h + h) + 4 * h + ffn
        return total

    def is_moe(self, layer: int) -> bool:
        return self.experts > 0 and (layer + 1) % self.moe_every == 0

    def replace(self, **kw) -> "GPTConfig":
        return replace(self, **kw)

    @classmethod
    def from_flags(cls, a, **kw) -> "GPTConfig":
        """The model of a command line's parsed flags (`--vocab --seq --layers --heads --hidden
        --experts --top-k`, shared by `minipar.train` and `minipar.serve`). A dense model's top-k is
        left at 1, whatever the flag says: it has nothing to choose from."""
        shape = dict(vocab=a.vocab, seq=a.seq, layers=a.layers, heads=a.heads, hidden=a.hidden)
        return cls(**shape, experts=a.experts, top_k=min(a.top_k, max(a.experts, 1)), **kw)

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
