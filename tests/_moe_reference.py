"""An MoE layer and its training loop written from the papers, for the MoE and EP parity tests.

It imports nothing from `minipar.moe` or `minipar.ep`: routing, capacity, dropping and the losses
are written here from the equations, and tokens reach the experts through GShard's dense
dispatch and combine tensors (einsums over [tokens, experts, capacity]), not through minipar's
sort-by-expert permutation or its all-to-all. Only the parameters (router, expert MLPs, shared
expert) are the same modules, initialized by name as the reference GPT's.

  router (Switch, Fedus et al. 2021, eq. 1):    p = softmax(W_r x)
         (DeepSeek-V3 eq. 15-16, "sigmoid"):    s = sigmoid(W_r x); choose top-k of s + b; g = s / Σ_chosen s
  gates:  top-1: the raw probability p_i (Switch eq. 2); top-k > 1: renormalized over the k
          (GShard, Lepikhin et al. 2020, Alg. 1: g1 / (g1 + g2))
  capacity (Switch Sec. 2.2; GShard Alg. 1, C = 2S/E for top-2):  C = ceil(k·S·CF / E), S tokens per group
  slots (GShard Alg. 1): first choices take slots in token order (cumsum of their one-hot); the j-th
          choices start after the kept choices of rounds < j; a choice is kept iff its slot < C
  aux loss (Switch eq. 4-6): α·E·Σ_i f_i·P_i per group, f_i = fraction of the group's tokens whose first
          choice is i, P_i = the group's mean router probability of i (for sigmoid: s normalized per token)
  z-loss (ST-MoE, Zoph et al. 2022, eq. 5): β·mean over tokens of (log Σ_j exp logit_j)²
  aux-loss-free balancing (DeepSeek-V3 Sec. 2.1.2): after each step b_i += γ·sign(mean load − load_i)
GShard's random routing of the second expert is left out, as minipar leaves it out.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipar.layers import MLP, init_gpt
from minipar.model import GPT, SyntheticData, make_optimizer


class PaperMoE(nn.Module):
    def __init__(self, cfg, router=None, experts=None, shared=None):
        super().__init__()
        self.cfg, self.E, self.k = cfg, cfg.experts, cfg.top_k
        self.router = router if router is not None else nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = (
            experts if experts is not None else nn.ModuleDict({str(i): MLP(cfg) for i in range(cfg.experts)})
        )
        self.shared = shared if shared is not None else (MLP(cfg) if cfg.shared_expert else None)
        self.bias = torch.zeros(cfg.experts)
        self.aux_loss = torch.zeros(())
        self.keep, self.chosen, self.load, self.dropped = None, None, None, 0

    @classmethod
    def sharing(cls, layer):
        """The paper's layer over the parameters of an existing MoE layer."""
        return cls(layer.cfg, layer.router, layer.experts, layer.shared)

    def capacity(self, S: int) -> int:
        if math.isinf(self.cfg.capacity_factor):
            return S  # each token reaches an expert at most once: nothing drops
        return max(self.cfg.min_capacity, math.ceil(self.k * S * self.cfg.capacity_factor / self.E))

    def gates(self, logits):
        """-> (P for the aux loss [S, E], chosen experts [S, k] best first, their gates [S, k])."""
        if self.cfg.router == "softmax":
            p = logits.softmax(-1)
            chosen = (p + self.bias).topk(self.k, -1).indices
            g = p.gather(-1, chosen)
            return p, chosen, (g / g.sum(-1, keepdim=True) if self.k > 1 else g)
        s = torch.sigmoid(logits)
        chosen = (s + self.bias).topk(self.k, -1).indices
        g = s.gather(-1, chosen)
        return s / s.sum(-1, keepdim=True), chosen, g / g.sum(-1, keepdim=True)

    def group(self, x, logits):
        """One group of S tokens (GShard's dispatch and combine): -> (y, aux loss, kept [S, k], chosen)."""
        S, E, C = x.shape[0], self.E, self.capacity(x.shape[0])
        p, chosen, g = self.gates(logits)
        combine = x.new_zeros(S, E, C)
        dispatch = torch.zeros(S, E, C, dtype=torch.bool)
        keep = torch.zeros(S, self.k, dtype=torch.bool)
        taken = torch.zeros(E, dtype=torch.long)  # slots filled by the rounds before this one
        for j in range(self.k):
            mask = F.one_hot(chosen[:, j], E)  # [S, E]
            position = (mask.cumsum(0) - 1 + taken) * mask  # slot in its expert's buffer
            kept = mask.bool() & (position < C)
            taken = taken + kept.sum(0)
            keep[:, j] = kept.any(-1)
            slot = F.one_hot(position.clamp(max=C - 1), C).bool() & kept[..., None]  # [S, E, C]
            dispatch |= slot
            combine = combine + g[:, j, None, None] * slot
        expert_in = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
        expert_out = torch.stack([self.experts[str(e)](expert_in[e]) for e in range(E)])
        y = torch.einsum("sec,ecm->sm", combine, expert_out)
        f = F.one_hot(chosen[:, 0], E).to(x.dtype).mean(0)  # Switch eq. 5
        aux = self.cfg.aux_alpha * E * (f * p.mean(0)).sum()  # Switch eq. 4, 6
        return y, aux, keep, chosen

    def forward(self, x):
        shape, cfg = x.shape, self.cfg
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        G = cfg.moe_groups
        parts = [self.group(xs, ls) for xs, ls in zip(x.chunk(G), logits.chunk(G))]
        y = torch.cat([part[0] for part in parts])
        if self.shared is not None:
            y = y + self.shared(x)
        self.aux_loss = sum(part[1] for part in parts) / G
        if cfg.z_loss:
            self.aux_loss = self.aux_loss + cfg.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
        self.keep = torch.cat([part[2] for part in parts])
        self.chosen = torch.cat([part[3] for part in parts])
        self.load = torch.bincount(self.chosen.flatten(), minlength=self.E)
        self.dropped = int((~self.keep).sum())
        return y.view(shape)


def paper_gpt(cfg, seed: int = 0) -> GPT:
    """The reference GPT with every MoE block's feed-forward a `PaperMoE`, initialized by name."""
    model = GPT(cfg.replace(experts=0), seed)
    for i, blk in enumerate(model.blocks):
        if cfg.is_moe(i):
            blk.mlp = PaperMoE(cfg)
    return init_gpt(model, seed, cfg.layers)


def paper_layers(model) -> list[PaperMoE]:
    return [m for m in model.modules() if isinstance(m, PaperMoE)]


def train_paper(cfg, steps: int, batch_size: int = 8, seed: int = 0, gamma: float = 0.0, **optim) -> dict:
    """The single-device loop over `paper_gpt`: {"losses", "first_grads", "params", "keep" and "chosen" (last
    step, per MoE layer: [T, k] kept mask and experts), "dropped" (per step, the fraction of choices dropped),
    "bias" (final, per MoE layer)}."""
    torch.manual_seed(seed)
    model = paper_gpt(cfg, seed)
    opt = make_optimizer(model.parameters(), **optim)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    out = dict(losses=[], first_grads={}, dropped=[])
    for step in range(steps):
        x, y = data.batch(step, batch_size)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        out["first_grads"] = out["first_grads"] or {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        opt.step()
        out["losses"].append(loss.item())
        layers = paper_layers(model)
        out["dropped"].append(sum(m.dropped for m in layers) / sum(m.keep.numel() for m in layers))
        for m in layers:  # DeepSeek-V3: after the step, nudge each bias against its expert's load
            m.bias += gamma * torch.sign(m.load.double().mean() - m.load.double()).float()
    out.update(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        keep=[m.keep for m in paper_layers(model)],
        chosen=[m.chosen for m in paper_layers(model)],
        bias=[m.bias.clone() for m in paper_layers(model)],
    )
    return out
