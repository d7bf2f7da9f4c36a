"""The composed model's optimizer: what composition adds to ZeRO. Every gradient is summed over
the replicas of its parameter, in the right order, then stepped (AdamW by default), with ZeRO
stages 0-3 over dp (Rajbhandari et al. 2020; stages 1-3 are `minipar.zero.ZeRO` itself).

A parameter of the composed model is replicated over some mesh axes, and each replica saw
different tokens. The gradient of the global mean loss is therefore

    DualPipe's mirror copy  ->  SP partial sums over tp  ->  sum over cp, over ep (dense weights
    only), over dp  ->  / (dp*ep*cp)

  zero  what dp shards           how the dp sum happens                       state per rank
  0     nothing                  all-reduce at the step                        (P+G+K)Ψ
  1     optimizer state          reduce-scatter at the step, all-gather after  (P+G)Ψ + KΨ/dp
  2     + gradients              reduce-scatter per micro-batch (backward hooks) PΨ + (G+K)Ψ/dp
  3     + parameters (FSDP)      the same; units gathered for each F and B      (P+G+K)Ψ/dp

with Ψ this rank's parameters (its TP slices and pipeline stages) and K = 8 (fp32 AdamW: the
parameter is its own master). Under ZeRO the dp sum comes first, as ZeRO's reduce-scatter (which
averages); the sums over tp (SP parameters), ep (dense ones) and cp then run on the gradient
shards: a sum commutes with the reduce-scatter, and every rank of a tp, ep or cp group holds the
same shard layout. The units are FSDP's usual wrapping: one per embedding, block and head.

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
from .mappings import sync_sequence_parallel_grads
from .model import make_optimizer
from .zero import ZeRO

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
    """Sum every gradient over its replicas, then step this rank's parameters. `module` (a
    ComposedStage, or {stage: ComposedStage} under pp) is needed for ZeRO, which re-homes the
    parameters into flat units. `mirror`: DualPipe's pair of ranks holding the same layers.
    `optim`: overrides of `model.make_optimizer` (e.g. kind="sgd" for sharp parity tests)."""

    def __init__(self, named_params: list, pc, module=None, mirror=None, **optim):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.numel = sum(p.numel() for p in self.params)
        self.pc, self.mirror = pc, mirror
        self.name_of = {id(p): n for n, p in named_params}
        if pc.zero == 0:
            self.opt = make_optimizer(self.params, **optim)
            return
        if module is None:
            raise ValueError(
                "ZeRO shards the stage modules' parameters: pass module= (one or {stage: module})"
            )
        stages = _as_stages(module)
        units = [u for s in sorted(stages) for u in stage_units(stages[s])]
        # an MoE block's experts may get no tokens, so no gradient: it reduces at backward's end
        late = {
            name for name, mods in units if any(hasattr(m, "experts") for md in mods for m in md.modules())
        }
        self.zero = ZeRO(
            torch.nn.ModuleDict({str(s): m for s, m in stages.items()}),
            stage=pc.zero,
            group="dp",
            units=units,
            spans=False,
            late=late,
            optim=optim,
        )
        self.units, self.opt = self.zero.units, self.zero.optim.optimizer
        r = comm.local_rank("dp")
        for u in self.units:  # which of this rank's shard elements need a sum over tp (SP) or ep (dense)
            sp, dense, off = (
                torch.zeros(u.padded, dtype=torch.bool),
                torch.zeros(u.padded, dtype=torch.bool),
                0,
            )
            for p in u.params:
                sp[off : off + p.numel()] = getattr(p, "sequence_parallel", False)
                dense[off : off + p.numel()] = ".experts." not in self.name_of[id(p)]
                off += p.numel()
            mine = slice(r * u.shard_numel, (r + 1) * u.shard_numel)
            u.sp_index, u.dense_index = sp[mine].nonzero().flatten(), dense[mine].nonzero().flatten()

    @torch.no_grad()
    def step(self) -> None:
        pc = self.pc
        if self.mirror is not None:  # DualPipe: each copy saw half the micro-batches; names order both ranks
            comm.all_reduce_grads([p for _, p in sorted(zip(self.names, self.params))], group=self.mirror)
        if pc.zero == 0:
            for p in self.params:  # an expert without tokens still takes part in every sum
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            sync_sequence_parallel_grads(self.params, "tp")  # LayerNorms etc. saw only s/t tokens under SP
            dense = [p for n, p in zip(self.names, self.params) if ".experts." not in n]
            comm.all_reduce_grads(self.params, group="cp")  # replicas that saw other sequence slices
            comm.all_reduce_grads(dense, group="ep")  # dense weights saw every ep rank's tokens
            comm.all_reduce_grads(self.params, group="dp", scale=1.0 / (pc.dp * pc.ep * pc.cp))
            self.opt.step()
            return
        grads = self.zero.reduce_gradients()  # averaged over dp
        for u, g in zip(self.units, grads):
            for index, axis in ((u.sp_index, "tp"), (u.dense_index, "ep")):
                if len(index) and comm.size(axis) > 1:
                    g[index] = comm.all_reduce(g[index], group=axis)
            comm.all_reduce(g, group="cp")
            g.mul_(1.0 / (pc.cp * pc.ep))
        self.applied = grads  # what this step applied, for `gradients`
        self.zero.apply(grads)

    def zero_grad(self) -> None:
        if self.pc.zero >= 1:  # ZeRO owns the gradients (ZeRO-1: views into its flat buffers)
            self.zero.zero_grad()
            return
        for p in self.params:
            p.grad = None

    # ---- what the step holds: values, gradients, bytes
    def values(self) -> dict:
        """{name: this rank's (TP-local) parameter value}; ZeRO-3 gathers them over dp."""
        if self.pc.zero == 3:
            full = self.zero.full_parameters()  # keyed by the ModuleDict's names: "<stage>.<name>"
            return {self.name_of[id(p)]: full[self.zero.names[id(p)]] for p in self.params}
        return dict(zip(self.names, self.params))

    @torch.no_grad()
    def gradients(self) -> dict:
        """{name: this rank's (TP-local) gradient as the last step applied it, summed and averaged
        over every replica}; gathered over dp under ZeRO. For parity tests: call after step()."""
        if self.pc.zero == 0:
            return {n: p.grad.clone() for n, p in zip(self.names, self.params)}
        out = {}
        for g, (_, named, _) in zip(self.applied, self._flats()):
            full, off = comm.all_gather(g, group="dp"), 0
            for n, p in named:
                out[n] = full[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
        return out

    def state_bytes(self) -> dict:
        """Model-state bytes this rank holds now (ZeRO's table: P, G, K per parameter)."""
        if self.pc.zero >= 1:
            b = self.zero.model_state_bytes()
            return dict(
                params=b["params"],
                grads=b["grads"],
                optimizer=b["optimizer"],
                numel=self.numel,
                padded=sum(u.padded for u in self.units),
            )
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        moments = [
            v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        return dict(
            params=nbytes(self.params),
            grads=nbytes([p.grad for p in self.params if p.grad is not None]),
            optimizer=nbytes(moments),
            numel=self.numel,
            padded=self.numel,
        )

    # ---- checkpoints: AdamW's moments per parameter, whatever the sharding
    def _flats(self):
        """(optimizer key, [(name, param)], padded numel) per flat shard this rank steps."""
        return [
            (m, [(self.name_of[id(p)], p) for p in u.params], u.padded)
            for m, u in zip(self.zero.optim.masters, self.units)
        ]

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
                out[n] = (m[off : off + k].view(p.shape), v[off : off + k].view(p.shape))
                off += k
        return out

    @torch.no_grad()
    def load_moments(self, moments: dict, step: int) -> None:
        """Inverse of `moments`: this rank's slices of every parameter's moments."""
        t = torch.tensor(float(step))  # AdamW keeps its step count on the CPU
        if self.pc.zero == 0:
            for n, p in zip(self.names, self.params):
                self.opt.state[p] = {
                    "step": t.clone(),
                    "exp_avg": moments[n][0].clone(),
                    "exp_avg_sq": moments[n][1].clone(),
                }
            return
        n, r = comm.size("dp"), comm.local_rank("dp")
        for key, named, padded in self._flats():
            S = padded // n
            flat = [torch.zeros(padded, device=key.device) for _ in range(2)]
            for k in range(2):
                flat[k][: sum(p.numel() for _, p in named)] = torch.cat(
                    [moments[name][k].flatten() for name, _ in named]
                )
            self.opt.state[key] = {
                "step": t.clone(),
                "exp_avg": flat[0][r * S : (r + 1) * S].clone(),
                "exp_avg_sq": flat[1][r * S : (r + 1) * S].clone(),
            }
