"""Mixture of experts: a router sends each token to k of E expert MLPs.

A dense MLP spends the same FLOPs on every token. An MoE layer holds E MLPs
("experts") and a router that picks k of them per token, so parameters grow with
E while FLOPs per token grow only with k (Shazeer et al. 2017; Switch, Fedus et
al. 2021; GShard, Lepikhin et al. 2020; DeepSeek-V3, 2024).

Router, for a token x with logits s = W_r x (E numbers):
    softmax (Switch top-1, GShard/Mixtral top-2):
        p = softmax(s),  chosen = top-k of p,  weight g_j = p_j  (renormalized over the k when k > 1)
    sigmoid (DeepSeek-V3, eq. 15-16):
        a = sigmoid(s),  chosen = top-k of (a + b),  g_j = a_j / sum of a over the chosen k
    The bias b (aux-loss-free balancing) only changes *which* experts are chosen, never the weights.

Output:  y = sum over kept choices j of  g_j * Expert_j(x)  (+ SharedExpert(x), DeepSeek style).

Capacity (Switch eq. 4, GShard Alg. 1): each expert takes at most
    C = max(min_capacity, ceil(T * k * CF / E))
of a group's T tokens. Choices beyond C are dropped: the token's MoE output lacks that
expert, and the block's residual x + moe(x) carries it through unchanged. First choices
of every token get slots before any second choice (GShard). CF = inf: dropless.

Losses, added to the model loss through `GPT.aux_loss()`:
    Switch aux loss (Switch eq. 4-6):  alpha * E * sum_i f_i * P_i,
        f_i = fraction of tokens whose first choice is i,  P_i = mean router probability of i.
        Uniform routing gives alpha; everything on one expert with probability 1 gives alpha * E.
    router z-loss (ST-MoE, Zoph et al. 2022, eq. 5):  beta * mean over tokens of logsumexp(s)^2.
    Aux-loss-free balancing (DeepSeek-V3 Sec. 2.1.2): after each step,
        b_i <- b_i + gamma * sign(mean load - load_i).

Groups (GShard Sec. 2.2): capacity and the aux loss are computed per group of tokens.
`cfg.moe_groups` contiguous groups split the batch; under expert parallelism each rank's
tokens are its own group(s), so a single-device run with moe_groups = number of data
shards drops exactly the tokens the parallel run drops.

Cost: E expert MLPs hold E * 8h^2 parameters (E/ep per rank under expert parallelism,
see `minipar.ep`); each token costs k expert MLPs of FLOPs; the buffers hold at most
E * C token rows per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .layers import MLP, GPTConfig

__all__ = [
    "capacity",
    "switch_aux_loss",
    "router_z_loss",
    "route",
    "assign_slots",
    "MoE",
    "permute",
    "combine",
    "local_dispatch",
    "check_config",
    "moe_layers",
    "split_tokens",
    "skew_router",
    "update_bias",
]


def check_config(cfg: GPTConfig, ep: int = 1) -> None:
    """Raise a ValueError that says how to fix a bad MoE configuration."""
    E, k = cfg.experts, cfg.top_k
    if E < 1:
        raise ValueError(f"experts={E}: an MoE layer needs at least one expert (experts=0 means a dense MLP)")
    if not 1 <= k <= E:
        raise ValueError(
            f"top_k={k} with experts={E}: each token picks k *distinct* experts, "
            f"so 1 <= top_k <= experts; lower top_k or add experts"
        )
    if not cfg.capacity_factor > 0:
        raise ValueError(
            f"capacity_factor={cfg.capacity_factor} must be > 0 "
            "(1.0-1.25 is typical; float('inf') means dropless)"
        )
    if cfg.router not in ("softmax", "sigmoid"):
        raise ValueError(
            f"router={cfg.router!r}: choose 'softmax' (Switch/GShard) or 'sigmoid' (DeepSeek-V3)"
        )
    if cfg.moe_groups < 1 or cfg.min_capacity < 0:
        raise ValueError(f"moe_groups={cfg.moe_groups} must be >= 1 and min_capacity={cfg.min_capacity} >= 0")
    if ep < 1 or E % ep:
        fits = [d for d in range(1, E + 1) if E % d == 0]
        raise ValueError(
            f"experts={E} cannot be split evenly over ep={ep} ranks: every rank holds "
            f"E/ep experts; choose ep in {fits} or change the number of experts"
        )


def capacity(
    num_tokens: int, num_experts: int, top_k: int = 1, capacity_factor: float = 1.25, min_capacity: int = 0
) -> int:
    """Slots per expert: max(min_capacity, ceil(tokens * k * CF / E)); CF = inf gives
    `num_tokens` (an expert can receive each token at most once, so nothing drops)."""
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} with num_experts={num_experts}: need 1 <= top_k <= num_experts")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (float('inf') for dropless)")
    if math.isinf(capacity_factor):
        return max(int(num_tokens), int(min_capacity))
    return max(int(min_capacity), math.ceil(num_tokens * top_k * capacity_factor / num_experts))


def switch_aux_loss(
    router_probs: torch.Tensor,
    expert_index: torch.Tensor,
    alpha: float = 0.01,
    first_choices: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * E * sum_i f_i * P_i (Switch Transformer eq. 4-6), f from the first choice.

    router_probs: [tokens, E] (rows sum to 1); expert_index: [tokens, k]. Leading group
    dimensions [G, tokens, ...] are allowed: the loss is computed per group and averaged.
    f is a count, so the gradient reaches the router through P only. When a group's tokens
    are spread over ranks (context or sequence parallelism), pass `first_choices` [..., E],
    the whole group's count of first choices per expert: f is then the group's, P stays the
    mean over this rank's tokens, and the loss is linear in this rank's tokens (see MoE)."""
    E = router_probs.shape[-1]
    if first_choices is None:
        first_choices = F.one_hot(expert_index[..., 0], E).sum(-2)
    f = first_choices.to(router_probs.dtype) / first_choices.sum(-1, keepdim=True)
    P = router_probs.mean(-2)
    return alpha * E * (f * P).sum(-1).mean()


def router_z_loss(logits: torch.Tensor, coef: float = 1e-3) -> torch.Tensor:
    """coef * mean(logsumexp(logits)^2) (ST-MoE eq. 5): keeps router logits small, so the
    softmax stays in a numerically safe range."""
    return coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def route(logits: torch.Tensor, k: int, kind: str = "softmax", bias: torch.Tensor | None = None):
    """-> (probs [T, E] for the aux loss, expert_index [T, k] best first, weights [T, k]).

    `bias` (aux-loss-free balancing) is added for the choice only."""
    scores = logits.softmax(-1) if kind == "softmax" else torch.sigmoid(logits)
    select = scores if bias is None else scores + bias
    index = select.topk(k, dim=-1).indices
    weights = scores.gather(-1, index)
    if kind == "sigmoid" or k > 1:  # Switch keeps the raw top-1 probability, so the router learns
        weights = weights / weights.sum(-1, keepdim=True)
    probs = scores if kind == "softmax" else scores / scores.sum(-1, keepdim=True)
    return probs, index, weights


def assign_slots(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slot of each choice in its expert's buffer, [..., T, k]: a choice is kept iff slot < C.

    Priority is choice-major (GShard): every token's first choice, in token order,
    then every second choice, and so on."""
    T, k = expert_index.shape[-2:]
    onehot = F.one_hot(expert_index, num_experts)  # [..., T, k, E]
    queue = onehot.transpose(-3, -2).flatten(-3, -2)  # [..., k*T, E] in priority order
    slot = ((queue.cumsum(-2) - 1) * queue).sum(-1)  # place in its expert's queue
    return slot.unflatten(-1, (k, T)).transpose(-1, -2)


def permute(index: torch.Tensor, keep: torch.Tensor, num_experts: int):
    """The kept (token, choice) pairs sorted by expert (hence by destination rank under EP):
    -> (token, choice, expert) per row, and the row count of each expert."""
    tok, choice = keep.nonzero(as_tuple=True)
    expert = index[tok, choice]
    order = torch.argsort(expert, stable=True)
    tok, choice, expert = tok[order], choice[order], expert[order]
    return tok, choice, expert, torch.bincount(expert, minlength=num_experts)


def combine(x: torch.Tensor, tok, choice, out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Un-permute: y_t = sum over t's kept choices j of g_j * (expert output row of (t, j))."""
    return torch.zeros_like(x).index_add(0, tok, out * weights[tok, choice, None])


def local_dispatch(x, index, weights, keep, experts, num_experts):
    """Every expert on this rank: permute, run each expert on its contiguous rows, combine.
    `minipar.ep` installs its all-to-all dispatcher in place of this one (as Megatron-Core's
    MoE layer takes a token dispatcher). -> (y [T, h], split sizes for the stats)."""
    tok, choice, _, counts = permute(index, keep, num_experts)
    out = torch.cat([e(rows) for e, rows in zip(experts.values(), x[tok].split(counts.tolist()))])
    n = [int(counts.sum())]
    return combine(x, tok, choice, out, weights), dict(
        table=counts[None].detach().cpu(), send_splits=n, recv_splits=n
    )


class MoE(nn.Module):
    """Drop-in replacement of the block's MLP. Experts are named experts.<global index>, so
    every expert is initialized from its name and an expert-parallel shard equals the
    single-device layer by construction. After each forward: `aux_loss` (a scalar) and
    `stats` (load, kept mask, capacity, drops, and the all-to-all split sizes).

    Installed by the strategies that use it: `dispatcher` (expert parallelism's all-to-all),
    and `split_tokens` (context or sequence parallelism: a group's tokens spread over ranks)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check_config(cfg)
        self.cfg, self.num_experts, self.top_k = cfg, cfg.experts, cfg.top_k
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = nn.ModuleDict({str(i): MLP(cfg) for i in range(cfg.experts)})
        self.shared = MLP(cfg) if cfg.shared_expert else None
        self.register_buffer("expert_bias", torch.zeros(cfg.experts))  # selection only, never trained
        self.groups = cfg.moe_groups  # groups in the batch this layer sees
        self.dispatcher = local_dispatch
        self.token_axes, self.share = (), 1.0  # see split_tokens
        self.aux_loss = torch.zeros(())
        self.step_load = torch.zeros(
            cfg.experts, dtype=torch.long
        )  # routed choices since the last bias update
        self.stats: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, cfg, E, k = x.shape, self.cfg, self.num_experts, self.top_k
        x = x.reshape(-1, shape[-1])
        T, G = x.shape[0], self.groups
        if T % G:
            raise ValueError(
                f"{T} tokens cannot form moe_groups={G} equal groups; pick moe_groups dividing "
                "batch*seq (under expert parallelism: a multiple of the data shards)"
            )
        logits = self.router(x)
        probs, index, weights = route(logits, k, cfg.router, self.expert_bias)
        C = capacity(T // G, E, k, cfg.capacity_factor, cfg.min_capacity)
        keep = assign_slots(index.view(G, T // G, k), E).reshape(T, k) < C
        self.aux_loss = self.balance_loss(logits, probs.view(G, T // G, E), index.view(G, T // G, k))
        y, sent = self.dispatcher(x, index, weights, keep, self.experts, E)
        if self.shared is not None:
            y = y + self.shared(x)
        load = torch.bincount(index.flatten().cpu(), minlength=E)
        if self.training:
            self.step_load = self.step_load + load
        self.stats = dict(
            load=load,
            kept_load=torch.bincount(index[keep].cpu(), minlength=E),
            keep=keep.detach().cpu(),
            capacity=C,
            dropped=int((~keep).sum()),
            choices=T * k,
            **sent,
        )
        return y.view(shape)

    def balance_loss(self, logits, probs, index) -> torch.Tensor:
        """Switch's aux loss (+ ST-MoE's z-loss) of this rank's tokens. When a group's tokens are
        spread over `token_axes`, f counts the whole group (one all-reduce of G*E counts per
        axis, as Megatron-Core reduces tokens_per_expert over tp and cp) while P and the z-loss
        average this rank's tokens: the training loop averages the cp ranks' losses like their
        cross-entropies, and `share` = 1/tp divides what the tp ranks' gradients sum (SP)."""
        cfg, aux = self.cfg, logits.new_zeros(())
        if cfg.aux_alpha:
            counts = F.one_hot(index[..., 0], self.num_experts).sum(-2)
            for axis in self.token_axes:
                comm.all_reduce(counts, group=axis)
            aux = aux + switch_aux_loss(probs, index, cfg.aux_alpha, counts)
        if cfg.z_loss:
            aux = aux + router_z_loss(logits, cfg.z_loss)
        return aux * self.share


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def split_tokens(model: nn.Module, axes: tuple = (), share: float = 1.0) -> None:
    """Tell every MoE layer that its groups' tokens are spread over the ranks of `axes` (cp, and
    tp under sequence parallelism) and what share of the loss this rank holds (1/tp under SP).
    Capacity is then unknowable locally (it ranks a group's tokens by position), so such a run
    must be dropless (capacity_factor = inf): `minipar.compose.check` says so."""
    for m in moe_layers(model):
        m.token_axes, m.share = tuple(axes), share


@torch.no_grad()
def update_bias(model: nn.Module, gamma: float, loads: list[torch.Tensor] | None = None) -> None:
    """DeepSeek-V3's aux-loss-free balancing, once per step: b_i += gamma * sign(mean - load_i).

    `loads` (one per MoE layer) overrides the layers' own `step_load`; data-parallel runs pass
    the load summed over every rank, so every replica nudges its biases identically."""
    for i, m in enumerate(moe_layers(model)):
        load = (m.step_load if loads is None else loads[i]).double()
        m.expert_bias += gamma * torch.sign(load.mean() - load).to(m.expert_bias)
        m.step_load = torch.zeros_like(m.step_load)


@torch.no_grad()
def skew_router(model: nn.Module, strength: float = 1.0, expert: int = 0) -> None:
    """A skewed start for balancing experiments: point each MoE block's ln2 bias along the
    router row of `expert`, which raises that expert's logit by `strength` for every token."""
    for blk in getattr(model, "blocks", []):
        if isinstance(blk.mlp, MoE):
            w = blk.mlp.router.weight[expert]
            blk.ln2.bias += strength * w / w.dot(w)
