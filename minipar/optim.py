"""The composed model's optimizer: average every gradient over its replicas, then AdamW,
with ZeRO stages 0-3 over dp (Rajbhandari et al. 2020).

A parameter of the composed model is replicated over some mesh axes, and each replica saw
different tokens. The gradient of the global mean loss is therefore

    SP partial sums over tp  ->  sum over cp, over ep (dense weights only), over dp  ->  / (dp*ep*cp)

(under ZeRO-2/3 the dp part comes first, as a reduce-scatter, and the others act on shards)

  zero  what dp shards           how the dp sum happens                    state per rank
  0     nothing                  all-reduce at the step                     (P+G+K)Ψ
  1     optimizer state          reduce-scatter, step the shard, all-gather (P+G)Ψ + KΨ/dp
  2     + gradients              per micro-batch reduce-scatter (ZeRO)       PΨ + (G+K)Ψ/dp
  3     + parameters (FSDP)      the same; gathered per unit for F and B     (P+G+K)Ψ/dp

with Ψ this rank's parameters (its TP slices and pipeline stages). Stages 2 and 3 reuse
`minipar.zero.ZeRO` on the stage modules, one unit per embedding, block and head (FSDP's
usual wrapping); its reduce-scatter averages over dp, and the sums over tp (SP
parameters) and cp then run on the gradient shards: a sum commutes with the
reduce-scatter, and every rank of a tp or cp group holds the same shard layout.

Stages 2 and 3 reduce-scatter from gradient hooks, which fire when backward() accumulates
a gradient. The pipeline executor's B does (per stage, per micro-batch: FSDP with a
pipeline gathers each unit twice per micro-batch, as torchtitan does with
reshard_after_forward); its zero-bubble I/W split computes weight gradients by hand, so
ZB and DualPipe schedules keep to ZeRO-1 (`compose.check` says so before launch). An MoE
block's experts may get no tokens and so no gradient: its unit reduce-scatters at the end of
backward instead, in unit order, so every dp rank issues the same collectives.
"""
from __future__ import annotations

import torch

from . import comm
from .model import make_optimizer
from .mappings import sync_sequence_parallel_grads

__all__ = ["Optimizer", "stage_units"]


def stage_units(stage) -> list:
    """FSDP's wrapping of a `compose.ComposedStage`: embeddings, each block, final norm + head."""
    units = [("embed", [stage.wte, stage.wpe])] if stage.first else []
    units += [(f"block{i}", [b]) for i, b in stage.blocks.items()]
    return units + ([("head", [stage.ln_f, stage.head])] if stage.last else [])


def _as_stages(module) -> dict:
    """{stage index: ComposedStage} from one stage module or a dict of them."""
    return dict(module) if isinstance(module, dict) else {0: module}


class Optimizer:
    """AdamW over this rank's parameters after averaging every gradient over its replicas.
    `module` (a ComposedStage, or {stage: ComposedStage} under pp) is needed for ZeRO-2/3,
    which re-home the parameters into flat units."""

    def __init__(self, named_params: list, pc, module=None, mirror=None):
        # dense parameters first, experts last: the ep all-reduce then covers one prefix slice
        named_params = sorted(named_params, key=lambda np_: ".experts." in np_[0])
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.dense = sum(p.numel() for n, p in named_params if ".experts." not in n)
        self.numel = sum(p.numel() for p in self.params)
        self.pc, self.mirror = pc, mirror   # mirror: DualPipe's pair of ranks holding the same layers
        self.name_of = {id(p): n for n, p in named_params}
        if pc.zero >= 2:
            from .zero import ZeRO
            if module is None:
                raise ValueError("ZeRO-2/3 shard the stage modules' parameters: pass module= (one or {stage: module})")
            stages = _as_stages(module)
            units = [u for s in sorted(stages) for u in stage_units(stages[s])]
            # an MoE block's experts may get no tokens, so no gradient: it reduces at backward's end
            late = {name for name, mods in units if any(hasattr(m, "experts") for md in mods for m in md.modules())}
            self.zero = ZeRO(torch.nn.ModuleDict({str(s): m for s, m in stages.items()}), stage=pc.zero,
                             group="dp", units=units, spans=False, late=late)
            self.units = self.zero.units
            self.opt = self.zero.optim.optimizer
            r = comm.local_rank("dp")
            for u in self.units:   # which of this rank's shard elements need a sum over tp (SP) or ep (dense)
                sp, dense, off = torch.zeros(u.padded, dtype=torch.bool), torch.zeros(u.padded, dtype=torch.bool), 0
                for p in u.params:
                    sp[off:off + p.numel()] = getattr(p, "sequence_parallel", False)
                    dense[off:off + p.numel()] = ".experts." not in self.name_of[id(p)]
                    off += p.numel()
                mine = slice(r * u.shard_numel, (r + 1) * u.shard_numel)
                u.sp_index, u.dense_index = sp[mine].nonzero().flatten(), dense[mine].nonzero().flatten()
            return
        if pc.zero == 0:
            self.opt = make_optimizer(self.params)
            return
        n, r = comm.size("dp"), comm.local_rank("dp")
        self.shard_numel = -(-self.numel // n)
        flat = torch.zeros(self.shard_numel * n, device=self.params[0].device)
        flat[:self.numel] = torch.cat([p.detach().flatten() for p in self.params])
        self.shard = flat[r * self.shard_numel:(r + 1) * self.shard_numel].clone().requires_grad_()
        self.opt = make_optimizer([self.shard])

    def flat_grads(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])

    @torch.no_grad()
    def step(self) -> None:
        pc = self.pc
        if pc.zero >= 2:
            for u in self.units:   # the shard is already averaged over dp by ZeRO's reduce-scatter
                g = u.grad_shard
                for index, axis in ((u.sp_index, "tp"), (u.dense_index, "ep")):
                    if len(index) and comm.size(axis) > 1:
                        g[index] = comm.all_reduce(g[index], group=axis)
                comm.all_reduce(g, group="cp")
                g.mul_(1.0 / (pc.cp * pc.ep))
            self.zero.step()
            return
        if self.mirror is not None:   # DualPipe: each copy saw half the micro-batches; names order both ranks alike
            comm.all_reduce_grads([p for _, p in sorted(zip(self.names, self.params))], group=self.mirror)
        sync_sequence_parallel_grads(self.params, "tp")   # LayerNorms etc. saw only s/t tokens under SP
        g = self.flat_grads()
        comm.all_reduce(g, group="cp")                    # replicas that saw other sequence slices
        comm.all_reduce(g[:self.dense], group="ep")       # dense weights saw every ep rank's tokens
        scale = 1.0 / (pc.dp * pc.ep * pc.cp)             # the loss is the mean over all data shards
        if pc.zero == 0:
            comm.all_reduce(g, group="dp")
            g.mul_(scale)
            for p, gp in zip(self.params, g.split([p.numel() for p in self.params])):
                p.grad = gp.view_as(p)
            self.opt.step()
            return
        padded = torch.cat([g, g.new_zeros(self.shard.numel() * comm.size("dp") - self.numel)])
        self.shard.grad = comm.reduce_scatter(padded, group="dp").mul_(scale)
        self.opt.step()
        full = comm.all_gather(self.shard.detach(), group="dp")[:self.numel]
        for p, v in zip(self.params, full.split([p.numel() for p in self.params])):
            p.copy_(v.view_as(p))

    def values(self) -> dict:
        """{name: this rank's (TP-local) parameter value}; ZeRO-3 gathers them over dp."""
        if self.pc.zero == 3:
            full = self.zero.full_parameters()      # keyed by the ModuleDict's names: "<stage>.<name>"
            return {self.name_of[id(p)]: full[self.zero.names[id(p)]] for p in self.params}
        return dict(zip(self.names, self.params))

    def state_bytes(self) -> dict:
        """Model-state bytes this rank holds now. Under ZeRO-1 the fp32 shard that AdamW steps
        is a copy of the parameters, so it counts as optimizer state (K = 4 + 8 bytes, as the
        ZeRO paper's mixed-precision K = 12)."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        if self.pc.zero >= 2:
            b = self.zero.model_state_bytes()
            return dict(params=b["params"], grads=b["grads"], optimizer=b["optimizer"], numel=self.numel,
                        padded=sum(u.padded for u in self.units))
        moments = [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        return dict(params=nbytes(self.params), grads=nbytes([p.grad for p in self.params if p.grad is not None]),
                    optimizer=nbytes(moments) + (nbytes([self.shard]) if self.pc.zero == 1 else 0),
                    numel=self.numel, padded=self.shard.numel() * comm.size("dp") if self.pc.zero == 1 else self.numel)

    def zero_grad(self) -> None:
        if self.pc.zero >= 2:
            self.zero.zero_grad()
        for p in self.params:
            p.grad = None

    # ---- checkpoints: AdamW's moments per parameter, whatever the sharding
    def _flats(self):
        """(optimizer key, [(name, param)], padded numel) per flat shard this rank steps."""
        if self.pc.zero >= 2:
            names = self.name_of
            return [(m, [(names[id(p)], p) for p in u.params], u.padded)
                    for m, u in zip(self.zero.optim.masters, self.units)]
        return [(self.shard, list(zip(self.names, self.params)), self.shard.numel() * comm.size("dp"))]

    @torch.no_grad()
    def moments(self) -> dict:
        """{name: (exp_avg, exp_avg_sq)} of this rank's parameters (gathered over dp under ZeRO)."""
        if self.pc.zero == 0:
            st = [self.opt.state.get(p, {}) for p in self.params]
            return {n: (s["exp_avg"], s["exp_avg_sq"]) for n, s in zip(self.names, st) if s}
        out = {}
        for key, named, _ in self._flats():
            st = self.opt.state.get(key)
            if not st:
                return {}
            m, v = (comm.all_gather(st[k], group="dp") for k in ("exp_avg", "exp_avg_sq"))
            off = 0
            for n, p in named:
                k = p.numel()
                out[n] = (m[off:off + k].view(p.shape), v[off:off + k].view(p.shape))
                off += k
        return out

    @torch.no_grad()
    def load_moments(self, moments: dict, step: int) -> None:
        """Inverse of `moments`: this rank's slices of every parameter's moments."""
        t = torch.tensor(float(step))  # AdamW keeps its step count on the CPU
        if self.pc.zero == 0:
            for n, p in zip(self.names, self.params):
                self.opt.state[p] = {"step": t.clone(), "exp_avg": moments[n][0].clone(), "exp_avg_sq": moments[n][1].clone()}
            return
        n, r = comm.size("dp"), comm.local_rank("dp")
        for key, named, padded in self._flats():
            S = padded // n
            flat = [torch.zeros(padded, device=key.device) for _ in range(2)]
            for k in range(2):
                flat[k][:sum(p.numel() for _, p in named)] = torch.cat([moments[name][k].flatten() for name, _ in named])
            self.opt.state[key] = {"step": t.clone(), "exp_avg": flat[0][r * S:(r + 1) * S].clone(),
                                   "exp_avg_sq": flat[1][r * S:(r + 1) * S].clone()}
