"""Megatron-LM tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", Sec. 3), with
sequence parallelism (Korthikanti et al. 2022; see `minipar.sp`) as an option.

A linear layer Y = XA can be split two ways over t ranks:

    column parallel:  A = [A_1 .. A_t]        Y_i = X A_i          (X whole on every rank)
    row parallel:     A = [A_1; ..; A_t]      Y = sum_i X_i A_i    (X split by columns)

Column then row needs no communication in between, so each sub-block is one
parallel region entered with f and left with g (Fig. 3 of the paper):

    f: identity forward, all-reduce backward     g: all-reduce forward, identity backward
    MLP:        f -> fc (column) -> GELU -> proj (row) -> g
    attention:  f -> q, k, v (column: a/t heads per rank) -> SDPA -> proj (row) -> g

Communication per layer per micro-batch: 4 all-reduces of b*s*h elements (2 forward,
2 backward). Per-rank parameters of a block: 12h^2/t, plus the replicated LayerNorms
and row biases. The vocabulary is split too: `VocabParallelEmbedding` rows and the
`head`'s columns, and `vocab_parallel_cross_entropy` never gathers the [b, s, V] logits.

The shards are slices of the reference `GPT`'s full weights, so the TP model *is* the
reference model: same names, same values (tested to 1e-5 after 5 AdamW steps).
Each parameter carries `tp_dim` (the dimension it is split along, or None) so
shards can be put back together, and `sequence_parallel` when SP leaves its gradient
partial on each rank (see `mappings.sync_sequence_parallel_grads`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm, mappings
from .mappings import SEQ, gather_linear, sync_sequence_parallel_grads
from .mesh import Mesh
from .model import GPT, GPTConfig, SyntheticData, make_optimizer, sdpa_causal
from .result import TrainResult
from .runtime import device, launch
from .validation import ConfigError, Problems

__all__ = [
    "check_tp",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "column_parallel",
    "ParallelAttention",
    "ParallelMLP",
    "ParallelBlock",
    "TPGPT",
    "train_tp",
    "run_tp",
    "unshard",
    "shards_of",
]


def check_tp(
    cfg: GPTConfig,
    t: int,
    sequence_parallel: bool = False,
    batch_seq: int | None = None,
    problems: Problems | None = None,
) -> None:
    """Megatron's rules for splitting `cfg` over t ranks, each with its reason; raises a
    ConfigError listing every problem (or adds them to `problems`, as `compose.check` does).

    We do not pad the vocabulary: Megatron pads V up to a multiple of 128*t
    (--make-vocab-size-divisible-by) with rows that are never a target, but their
    logits still enter the softmax, so the padded model would differ from the reference."""
    p = Problems() if problems is None else problems
    if p.integer("tp", t, low=1):
        p.divides("tp", t, "heads", cfg.heads, "each tensor-parallel rank holds whole attention heads")
        p.divides(
            "tp",
            t,
            "vocab",
            cfg.vocab,
            "the vocab-parallel embedding and head hold V/tp rows each; we do not pad the vocabulary",
        )
        p.divides("tp", t, "mlp_hidden", cfg.mlp_ratio * cfg.hidden, "the MLP's columns split evenly")
        if sequence_parallel:  # SP cuts each rank's sequence into tp equal slices
            p.divides(
                "tp",
                t,
                "seq",
                cfg.seq if batch_seq is None else batch_seq,
                "sequence parallelism splits the sequence over tp",
            )
    if problems is None:
        p.raise_if_any(f"tensor parallelism over {t} ranks cannot split this model")


def _shard(full: torch.Tensor, dim, group) -> nn.Parameter:
    """This rank's slice of a full weight along `dim` (None: the whole, replicated)."""
    if dim is None:
        p = nn.Parameter(full.detach().clone())
    else:
        p = nn.Parameter(full.detach().chunk(comm.size(group), dim)[comm.local_rank(group)].clone())
    p.tp_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i + b_i: rank i keeps rows i*out/t .. of nn.Linear's [out, in] weight.
    No communication: the region's entry operator (f, or SP's all-gather) made X whole,
    once for every column layer that reads it (q, k, v share it; Megatron fuses them)."""

    def __init__(self, full: nn.Linear, group="tp"):
        super().__init__()
        self.weight = _shard(full.weight, 0, group)
        self.bias = _shard(full.bias, 0, group) if full.bias is not None else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i A_i + b: rank i keeps columns i*in/t .. of the weight, computes its
    partial sum, and leaves the region: g (all-reduce) or, under SP, a reduce-scatter
    along the sequence. The bias is added after the sum, so it counts once."""

    def __init__(self, full: nn.Linear, group="tp", sequence_parallel=False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        self.weight = _shard(full.weight, 1, group)
        self.bias = _shard(full.bias, None, group)

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = mappings.reduce_scatter_along(y, SEQ, self.group) if self.sp else mappings.g(y, self.group)
        return y + self.bias


def column_parallel(x, layers, group="tp", sequence_parallel=False, regather=True) -> list:
    """Enter a parallel region and apply the column-parallel `layers` sharing input x."""
    if sequence_parallel and regather:
        return gather_linear(x, layers, group)  # keeps only x's s/t shard for backward
    if sequence_parallel:  # gathered along s, the view is laid out [s, b, h]: copy once, not per layer
        x = mappings.gather_along(x, SEQ, group).contiguous()
    else:
        x = mappings.f(x, group)
    return [layer(x) for layer in layers]


class VocabParallelEmbedding(nn.Module):
    """Rank i holds token rows [i*V/t, (i+1)*V/t). It looks up the tokens it owns, writes
    zeros for the others, and g (all-reduce) sums the one non-zero row per token.
    Under SP the sum is a reduce-scatter, so the output is already split along s."""

    def __init__(self, full: nn.Embedding, group="tp", sequence_parallel=False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        self.weight = _shard(full.weight, 0, group)
        self.lo = comm.local_rank(group) * self.weight.shape[0]

    def forward(self, idx):
        local = idx - self.lo
        mine = (local >= 0) & (local < self.weight.shape[0])
        y = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        y = y.masked_fill(~mine[..., None], 0.0)  # another rank's tokens: zero here, its rows come in the sum
        return mappings.reduce_scatter_along(y, SEQ, self.group) if self.sp else mappings.g(y, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_n = log sum_v exp(z_nv) - z_n,target over logits split along v (Megatron's
    cross_entropy.py). Three all-reduces of one number per token (max, target logit,
    sum of exps); backward is local: softmax - onehot, on this rank's columns."""

    @staticmethod
    def forward(ctx, logits, target, lo, group):
        z = logits - comm.all_reduce(logits.max(-1).values, "max", group)[:, None]  # stable exp
        local = target - lo
        mine = (local >= 0) & (local < z.shape[-1])
        local = local.clamp(0, z.shape[-1] - 1)
        target_logit = comm.all_reduce(z.gather(1, local[:, None])[:, 0] * mine, group=group)
        e = z.exp()
        sum_exp = comm.all_reduce(e.sum(-1), group=group)
        ctx.save_for_backward(e.div_(sum_exp[:, None]), local, mine)  # keep the softmax, in place
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, dloss):
        softmax, local, mine = ctx.saved_tensors
        grad = softmax.clone()
        grad[torch.arange(len(local), device=grad.device), local] -= mine.to(grad.dtype)
        return grad * dloss[:, None], None, None, None


def vocab_parallel_cross_entropy(logits, target, group="tp"):
    """Mean cross-entropy of [N, V/t] logit shards against [N] global targets."""
    lo = comm.local_rank(group) * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits.float(), target, lo, group).mean()


class ParallelAttention(nn.Module):
    """Causal self-attention on this rank's a/t heads: Q, K, V column-parallel, proj row-parallel."""

    def __init__(self, full, group="tp", sequence_parallel=False, regather=True):
        super().__init__()
        self.group, self.sp, self.regather = group, sequence_parallel, regather
        self.head_dim = full.head_dim
        self.q, self.k, self.v = (ColumnParallelLinear(getattr(full, n), group) for n in "qkv")
        self.proj = RowParallelLinear(full.proj, group, sequence_parallel)
        self.attn_fn = sdpa_causal  # swappable, as in the reference (context parallelism, recompute)

    def heads(self, x):  # [b, s, a/t * d] -> [b, a/t, s, d]
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def forward(self, x):
        q, k, v = (
            self.heads(y)
            for y in column_parallel(x, [self.q, self.k, self.v], self.group, self.sp, self.regather)
        )
        y = self.attn_fn(q, k, v)
        return self.proj(y.transpose(1, 2).flatten(2))


class ParallelMLP(nn.Module):
    """fc column-parallel (4h/t columns), GELU on the local shard, proj row-parallel."""

    def __init__(self, full, group="tp", sequence_parallel=False, regather=True):
        super().__init__()
        self.group, self.sp, self.regather = group, sequence_parallel, regather
        self.fc = ColumnParallelLinear(full.fc, group)
        self.proj = RowParallelLinear(full.proj, group, sequence_parallel)

    def forward(self, x):
        (h,) = column_parallel(x, [self.fc], self.group, self.sp, self.regather)
        return self.proj(F.gelu(h))


class ParallelBlock(nn.Module):
    """The reference Block with its attention and MLP split; LayerNorms replicated
    (and, under SP, applied to this rank's s/t tokens only)."""

    def __init__(self, full, group="tp", sequence_parallel=False, regather=True):
        super().__init__()
        self.ln1, self.ln2 = copy.deepcopy(full.ln1), copy.deepcopy(full.ln2)
        self.attn = ParallelAttention(full.attn, group, sequence_parallel, regather)
        self.mlp = ParallelMLP(full.mlp, group, sequence_parallel, regather)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TPGPT(nn.Module):
    """The reference GPT, tensor-parallel over `group` (and sequence-parallel if asked).
    forward(idx) -> this rank's [b, s, V/t] logits; forward(idx, targets) -> (logits, loss)."""

    def __init__(self, ref: GPT, group="tp", sequence_parallel=False, regather=True):
        super().__init__()
        self.cfg, self.group, self.sp, self.regather = ref.cfg, group, sequence_parallel, regather
        check_tp(ref.cfg, comm.size(group), sequence_parallel)
        self.wte = VocabParallelEmbedding(ref.wte, group, sequence_parallel)
        self.wpe = copy.deepcopy(ref.wpe)
        self.blocks = nn.ModuleList(ParallelBlock(b, group, sequence_parallel, regather) for b in ref.blocks)
        self.ln_f = copy.deepcopy(ref.ln_f)
        self.head = ColumnParallelLinear(ref.head, group)
        for name, p in self.named_parameters():
            if not hasattr(p, "tp_dim"):
                p.tp_dim = None
            # Under SP these saw only s/t tokens: their gradients are partial sums.
            p.sequence_parallel = sequence_parallel and p.tp_dim is None

    def embed(self, idx):
        x = self.wte(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        if self.sp:
            pos = pos.chunk(comm.size(self.group))[comm.local_rank(self.group)]
        return x + self.wpe(pos)

    def forward(self, idx, targets=None):
        if self.sp and idx.shape[1] % comm.size(self.group):
            check_tp(self.cfg, comm.size(self.group), True, batch_seq=idx.shape[1])
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        (logits,) = column_parallel(self.ln_f(x), [self.head], self.group, self.sp, self.regather)
        if targets is None:
            return logits
        return logits, vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.group)


def shards_of(model: nn.Module, what: str = "param") -> dict:
    """{name: (this rank's tensor, tp_dim)} of parameters ("param") or gradients ("grad")."""
    return {
        n: ((p if what == "param" else p.grad).detach().cpu().clone(), p.tp_dim)
        for n, p in model.named_parameters()
    }


def unshard(per_rank: list) -> dict:
    """Full tensors from every rank's `shards_of` dict: concatenate split ones, take rank 0's copy
    of replicated ones (which the parity tests check are equal on every rank)."""
    out = {}
    for name, (t0, dim) in per_rank[0].items():
        out[name] = t0 if dim is None else torch.cat([r[name][0] for r in per_rank], dim)
    return out


def train_tp(
    cfg: GPTConfig,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    group="tp",
    sequence_parallel: bool = False,
    regather: bool = True,
    **optim,
) -> TrainResult:
    """The reference training loop on one TP rank (call inside `launch`, with a Mesh holding `group`).

    Every rank of the group sees the same batch. Returns this rank's losses, final logits on step
    0's batch, the first and the last step's gradients ("first_grads", "grads") and the final
    parameters, as shards. `optim`: overrides of `make_optimizer` (kind="sgd" for parity tests)."""
    torch.manual_seed(seed)
    model = TPGPT(GPT(cfg, seed), group, sequence_parallel, regather).to(device())
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    opt = make_optimizer(model.parameters(), **optim)
    losses, first = [], None
    for step in range(steps):
        x, y = (t.to(device()) for t in data.batch(step, batch_size))
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        if sequence_parallel:
            sync_sequence_parallel_grads(model, group)
        losses.append(loss.item())
        grads = shards_of(model, "grad")
        first = first or grads
        opt.step()
    with torch.no_grad():
        logits = model(data.batch(0, batch_size)[0].to(device())).cpu()
    return TrainResult(
        losses, first_grads=first, grads=grads, params=shards_of(model), extra=dict(logits=logits)
    )


def _train_rank(t, cfg, kw):
    Mesh(tp=t)
    return train_tp(cfg, group="tp", **kw)


def run_tp(
    cfg: GPTConfig,
    t: int,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    sequence_parallel: bool = False,
    regather: bool = True,
    **optim,
) -> TrainResult:
    """Check the sizes, then `train_tp` on t simulated ranks; return rank 0's losses and the
    full logits, gradients (first and last step) and parameters put back together from every rank's shards."""
    check_tp(cfg, t, sequence_parallel)  # before any process starts
    if cfg.experts:
        raise ConfigError(["TPGPT covers dense blocks: set experts=0 (minipar.train composes MoE with tp)"])
    kw = dict(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        sequence_parallel=sequence_parallel,
        regather=regather,
        **optim,
    )
    out = launch(_train_rank, t, t, cfg, kw)
    return TrainResult(
        out[0].losses,
        first_grads=unshard([o.first_grads for o in out]),
        grads=unshard([o.grads for o in out]),
        params=unshard([o.params for o in out]),
        extra=dict(logits=torch.cat([o["logits"] for o in out], -1)),
    )
