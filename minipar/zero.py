"""ZeRO stages 1, 2, 3 (= FSDP) as one progression over flat, padded shards.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (SC20), Sec. 5 and 7. Ψ parameters, N data-parallel ranks; P, G bytes per
parameter and gradient element; K bytes of optimizer state per parameter (Adam with fp32
masters and 16-bit compute: K = 12; pure fp32 AdamW: K = 8, the parameter is the master):

  stage  also shards   FSDP name      model states per rank   traffic per step (elements)
  0      -             NO_SHARD (DDP) (P + G + K)Ψ            all-reduce               = 2Ψ
  1      optimizer     -              (P + G)Ψ + KΨ/N         reduce-scatter + all-gather = 2Ψ
  2      + gradients   SHARD_GRAD_OP  PΨ + (G + K)Ψ/N         reduce-scatter + all-gather = 2Ψ
  3      + parameters  FULL_SHARD     (P + G + K)Ψ/N          2 all-gathers + reduce-scatter = 3Ψ

(A ring all-reduce is a reduce-scatter plus an all-gather, hence "2Ψ"; on the wire each
Ψ costs (N-1)/N of its bytes. Stage 3 gathers every parameter twice, once for forward and
once for backward: 1.5x DDP's traffic.)

The model is cut into *units* (FSDP's wrapped modules: the embeddings, each block, the
head). A unit's parameters become views into one flat buffer (FSDP's FlatParameter),
zero-padded to a multiple of N so that it splits into N equal shards; rank r owns shard r.
AdamW is elementwise, so stepping a flat shard equals stepping the parameters, and the
padding (zero weight, zero gradient) stays zero.

Stage 3 frees a unit's flat buffer (its storage resized to 0, the parameter views stay
valid) and gathers it back right before the unit's forward and again right before its
backward; it prefetches the next unit (forward: i+1, backward: i-1) asynchronously, so the
gather overlaps the current unit's compute (on a GPU, on the communication stream: `streams`).
FSDP2 skips freeing the root after forward; we free every unit, as the paper counts.

Gradient accumulation: stage 1 accumulates full gradients and reduce-scatters once at the
step; stages 2 and 3 reduce-scatter every micro-batch into the gradient shard (as DeepSpeed
does), so `no_sync()` changes nothing for them. A unit does so when its last gradient
arrives or, if `late` (an MoE block: an expert without tokens gets no gradient), at the end
of each backward that reached it, in unit order, so every rank issues the same collectives.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from . import comm, trace
from .dp import default_group, held_bytes, train_steps
from .model import GPT, GPTConfig
from .offload import check_offload, nvme_bytes, shard_optimizer
from .precision import MixedPrecision
from .recompute import apply_recompute
from .result import TrainResult
from .runtime import device

__all__ = ["ZeRO", "Unit", "FSDP_NAMES", "stage_of", "gpt_units", "nvme_bytes", "check_offload", "train_zero"]

FSDP_NAMES = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0}


def stage_of(strategy) -> int:
    """A ZeRO stage from itself or from FSDP's ShardingStrategy name (NO_SHARD = 0 = DDP)."""
    if strategy in (0, 1, 2, 3):
        return strategy
    if strategy in FSDP_NAMES:
        return FSDP_NAMES[strategy]
    raise ValueError(f"unknown sharding {strategy!r}: use a ZeRO stage 0-3 or one of {list(FSDP_NAMES)}")


def gpt_units(model: GPT) -> list[tuple[str, list[nn.Module]]]:
    """FSDP's usual wrapping of a transformer: embeddings, one unit per block, the head.
    Modules are listed in the order the forward calls them."""
    return (
        [("embed", [model.wte, model.wpe])]
        + [(f"block{i}", [b]) for i, b in enumerate(model.blocks)]
        + [("head", [model.ln_f, model.head])]
    )


class Unit:
    """The parameters of some modules as views into one flat buffer, padded to N shards."""

    def __init__(self, index, name, modules, n, r, stage, mp: MixedPrecision, late=False):
        self.index, self.name, self.modules, self.late, self.touched = index, name, modules, late, False
        self.params = list({id(p): p for m in modules for p in m.parameters()}.values())
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = -(-self.numel // n)  # ceil
        self.padded = self.shard_numel * n
        self.flat = torch.zeros(self.padded, dtype=mp.param_dtype, device=device())
        off = 0
        with torch.no_grad():
            for p in self.params:
                self.flat[off : off + p.numel()].copy_(p.flatten())
                p.data = self.flat[off : off + p.numel()].view_as(
                    p
                )  # the module now computes on the flat buffer
                off += p.numel()
        mine = self.flat[r * self.shard_numel : (r + 1) * self.shard_numel]
        self.shard = mine.clone() if stage == 3 else mine  # stage 3 owns its shard apart from the buffer
        # stage 1 accumulates full gradients in one flat buffer (p.grad are views into it, so autograd
        # adds in place); stages 2 and 3 keep only their reduce-scattered shard
        self.flat_grad = self.grad_shard = None
        if stage == 1:
            self.flat_grad = torch.zeros_like(self.flat)
            self.grad_views = [
                self.flat_grad[o : o + p.numel()].view_as(p) for o, p in zip(self.offsets(), self.params)
            ]
        else:
            self.grad_shard = torch.zeros(self.shard_numel, dtype=mp.reduce_dtype, device=device())
        self.gather_handle, self.rs_handles = None, []
        self.gathered, self.in_backward, self.grads_ready, self.fwd_calls, self.t0 = True, False, 0, 0, None

    def offsets(self) -> list[int]:
        out, off = [], 0
        for p in self.params:
            out.append(off)
            off += p.numel()
        return out

    def free(self):
        self.flat.untyped_storage().resize_(0)
        self.gathered = False


class ZeRO(nn.Module):
    """Shard `model` over `group` at ZeRO `stage` (1, 2, 3 or an FSDP name; for NO_SHARD use
    `minipar.dp.DDP`). offload: "cpu" (or True) or "nvme" (files in `nvme_dir`), see offload.py.
    precision: a `MixedPrecision`. spans: trace each unit's F and B (off where the caller traces its own).
    late: names of units that reduce at the end of backward (see above). Call zero_grad(), the
    model, backward(loss), step()."""

    def __init__(
        self,
        model: nn.Module,
        stage=3,
        group=None,
        units=None,
        offload=False,
        precision=None,
        prefetch: bool = True,
        spans: bool = True,
        late=(),
        nvme_dir: str | None = None,
        optim: dict | None = None,
    ):
        super().__init__()
        self.stage = stage_of(stage)
        if self.stage == 0:
            raise ValueError("stage 0 (NO_SHARD) is plain data parallelism: use minipar.dp.DDP(model)")
        self.model, self.group, self.prefetch, self.spans = model, default_group(group), prefetch, spans
        self.mp = precision or MixedPrecision()
        n, r = comm.size(self.group), comm.local_rank(self.group)
        specs = units or (gpt_units(model) if isinstance(model, GPT) else [("model", [model])])
        self.units = [
            Unit(i, name, mods, n, r, self.stage, self.mp, self.stage >= 2 and name in late)
            for i, (name, mods) in enumerate(specs)
        ]
        covered = {id(p) for u in self.units for p in u.params}
        missing = [name for name, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise ValueError(f"parameters {missing} are in no unit: list their modules in `units`")
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.optim = shard_optimizer([u.shard for u in self.units], offload, nvme_dir, **(optim or {}))
        self.scaler = self.mp.make_scaler(self.group)
        self._queued, self.gathered_log = False, []
        for u in self.units:
            if self.stage >= 2:
                for p in u.params:
                    p.register_post_accumulate_grad_hook(self._grad_hook(u))
            for m in u.modules:
                if self.stage == 3:
                    m.register_forward_pre_hook(self._pre_forward(u))
                if self.stage == 3 or u.late:  # a late unit's _pre_backward marks it reached
                    m.register_forward_hook(self._post_forward(u))
            if self.stage == 3:
                u.free()

    # ------------------------------------------------------------------ stage 3: gather / free
    @torch.no_grad()  # gathering is bookkeeping, not part of the model's graph
    def _gather(self, u: Unit):
        """Start gathering `u` (async) unless it is here or on its way."""
        if u.gathered or u.gather_handle is not None:
            return
        u.flat.untyped_storage().resize_(u.padded * u.flat.element_size())
        u.gather_handle = comm.all_gather(u.shard, group=self.group, async_op=True, out=u.flat)
        self._log_gathered()

    def _free(self, u: Unit):
        self._wait(u)  # never free a buffer a collective is still writing
        u.free()
        self._log_gathered()

    def _log_gathered(self):
        """(time, bytes of full parameters alive): stage 3's memory over time."""
        self.gathered_log.append(
            (time.perf_counter(), sum(u.flat.untyped_storage().nbytes() for u in self.units))
        )

    @torch.no_grad()
    def _wait(self, u: Unit):
        self._gather(u)
        if u.gather_handle is not None:
            u.gather_handle.wait()
            u.gather_handle, u.gathered = None, True

    def _pre_forward(self, u: Unit):
        def hook(module, args):
            self._wait(u)
            if u.fwd_calls == 0:
                u.t0 = trace.now()
            if self.prefetch and u.index + 1 < len(self.units):  # overlaps this unit's compute
                self._gather(self.units[u.index + 1])

        return hook

    def _post_forward(self, u: Unit):
        def hook(module, args, out):
            if u.in_backward:  # a recompute inside backward: the unit must stay gathered
                return
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(self._pre_backward(u))
            u.fwd_calls += 1
            if u.fwd_calls == len(u.modules):  # the unit's last module: its forward is over
                u.fwd_calls = 0
                if self.stage == 3:
                    _span(f"F{u.index}", u.t0 if self.spans else None)
                    self._free(u)

        return hook

    def _pre_backward(self, u: Unit):
        def hook(grad):
            self._queue_finish()
            u.touched = True  # backward reached this unit: a late one reduces at the end
            if self.stage < 3:
                return grad
            self._wait(u)
            if not u.in_backward:
                u.in_backward, u.t0 = True, trace.now()
            if self.prefetch and u.index > 0:  # backward runs the units in reverse
                self._gather(self.units[u.index - 1])
            return grad

        return hook

    # ------------------------------------------------------------------ stages 2, 3: reduce-scatter
    def _grad_hook(self, u: Unit):
        def hook(p):
            self._queue_finish()
            u.grads_ready += not u.late
            if u.grads_ready == len(u.params):  # the unit's last gradient is in
                u.grads_ready = 0
                self._reduce_scatter(u)

        return hook

    def _reduce_scatter(self, u: Unit):
        full = _flat_grad(u).to(self.mp.reduce_dtype)
        for q in u.params:
            q.grad = None  # the full gradient lives only until its reduce-scatter
        u.rs_handles.append(comm.reduce_scatter(full, op="avg", group=self.group, async_op=True))
        u.touched = False
        if self.stage == 3:
            _span(f"B{u.index}", u.t0 if self.spans else None)
            u.in_backward, u.t0 = False, None
            self._free(u)

    def _queue_finish(self):
        if not self._queued:  # runs once the whole backward pass has finished
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._queued = True

    def _finish_backward(self):
        self._queued = False
        for u in self.units:
            if u.late and u.touched:
                self._reduce_scatter(u)
        for u in self.units:
            for h in u.rs_handles:
                u.grad_shard += h.wait()
            u.rs_handles, u.in_backward, u.grads_ready = [], False, 0
            if self.stage == 3 and (u.gathered or u.gather_handle is not None):  # e.g. unused parameters
                self._free(u)

    # ------------------------------------------------------------------ the training-loop interface
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def no_sync(self):  # stages 2 and 3 reduce every micro-batch anyway
        return nullcontext()

    def zero_grad(self):
        for u in self.units:
            if self.stage == 1:
                u.flat_grad.zero_()
                for p, view in zip(u.params, u.grad_views):
                    p.grad = view
            else:
                u.grad_shard.zero_()
                for p in u.params:
                    p.grad = None

    def backward(self, loss: torch.Tensor):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def local_grads(self) -> list[torch.Tensor]:
        """The gradients this rank holds now: full flat ones at stage 1, shards after."""
        return [u.flat_grad if self.stage == 1 else u.grad_shard for u in self.units]

    @torch.no_grad()
    def step(self) -> bool:
        """Reduce, step the shards, gather the parameters. False if the loss scaler skipped it."""
        return self.apply(self.reduce_gradients())

    @torch.no_grad()
    def reduce_gradients(self) -> list[torch.Tensor]:
        """Each unit's gradient shard, averaged over the group: stage 1 reduce-scatters its full
        gradients now; stages 2 and 3 did so during backward. (A caller that must also sum over
        other axes, such as `minipar.optim`, does it on these shards before `apply`.)"""
        if self.stage >= 2:
            return [u.grad_shard for u in self.units]
        for (
            u
        ) in self.units:  # a gradient someone replaced (a pipeline's W step adds out of place) goes back in
            for p, view in zip(u.params, u.grad_views):
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
        return [
            comm.reduce_scatter(u.flat_grad.to(self.mp.reduce_dtype), op="avg", group=self.group)
            for u in self.units
        ]

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor]) -> bool:
        """Step the shards with `grads` (unscaled first under fp16), then gather the parameters
        (stages 1, 2). Returns False if the loss scaler skipped the step."""
        if self.scaler is not None:
            found_inf = self.scaler.unscale_(grads)
            self.scaler.update(found_inf)
            if found_inf:
                return False
        self.optim.step(grads)
        if self.stage < 3:  # in place: each rank's shard is already its slot of the output
            hs = [comm.all_gather(u.shard, group=self.group, async_op=True, out=u.flat) for u in self.units]
            for h in hs:
                h.wait()
        return True

    # ------------------------------------------------------------------ measurement
    def model_state_bytes(self) -> dict:
        """Bytes this rank holds now: parameters (flat buffers and owned shards; a freed
        buffer counts 0), gradients, optimizer state (see ShardOptimizer.state_bytes)."""
        return dict(
            params=held_bytes([u.flat for u in self.units] + [u.shard for u in self.units]),
            grads=held_bytes(self.local_grads()),
            **self.optim.state_bytes(),
            padding=sum(u.padded - u.numel for u in self.units),
        )

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 parameter}, gathered (untraced: it is not part of training)."""
        return self._by_name(
            [u.shard for u in self.units] if self.stage == 3 else [u.flat for u in self.units]
        )

    @torch.no_grad()
    def full_gradients(self, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: full fp32 gradient} from each unit's shard `grads` (what `reduce_gradients` returned
        and `apply` unscaled), gathered untraced: for parity tests, not part of training."""
        return self._by_name(grads)

    def _by_name(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unit buffers (whole, or this rank's shard: then all-gathered) cut into named tensors."""
        out = {}
        with trace.enabled(False):
            for u, flat in zip(self.units, flats):
                if flat.numel() != u.padded:
                    flat = comm.all_gather(flat, group=self.group)
                off = 0
                for p in u.params:
                    out[self.names[id(p)]] = flat[off : off + p.numel()].view(p.shape).float().clone()
                    off += p.numel()
        return out


def _flat_grad(u: Unit) -> torch.Tensor:
    """A unit's full gradient as one padded flat tensor (a parameter without one counts zeros)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in u.params]
        + [u.flat.new_zeros(u.padded - u.numel)]
    )


def _span(name: str, t0):
    if t0 is not None:
        trace.record_span(name, t0)


def train_zero(
    cfg: GPTConfig,
    stage=3,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    grad_accum: int = 1,
    recompute=None,
    offload=False,
    precision: MixedPrecision | None = None,
    group=None,
    prefetch: bool = True,
    inject_overflow_at: int | None = None,
    nvme_dir: str | None = None,
    capture: bool = False,
    **optim,
) -> TrainResult:
    """Run on every rank: ZeRO training of the reference GPT. Returns losses, the final
    parameters, this rank's model-state bytes (measured before the last step) and the
    loss scaler's history. `inject_overflow_at=k` puts an inf in rank 0's gradient at step k. With
    offload="nvme" (before launching: `check_offload("nvme", dir, nvme_bytes(gpt_units(GPT(cfg)), N))`), `io`.
    capture=True adds `grads`: the first step's gradients as the optimizer applied them (averaged
    over the group, unscaled), gathered to full shape. `optim`: overrides of `make_optimizer`
    (kind="sgd" for parity tests of the parameters)."""
    torch.manual_seed(seed)
    model = GPT(cfg, seed).to(device())
    if recompute:
        apply_recompute(model, recompute)
    with trace.enabled(False):  # the trace holds the training steps, not the setup
        z = ZeRO(
            model,
            stage,
            group,
            offload=offload,
            precision=precision,
            prefetch=prefetch,
            nvme_dir=nvme_dir,
            optim=optim,
        )
    mem, first = {}, {}

    def step():
        mem.update(z.model_state_bytes())
        grads = z.reduce_gradients()
        z.apply(grads)
        if capture and not first:
            first.update(z.full_gradients(grads))

    def inject(step):
        if step == inject_overflow_at and comm.local_rank(z.group) == 0:
            z.local_grads()[0][0] = float("inf")

    losses = train_steps(
        z, step, cfg, steps, batch_size, seed, grad_accum, spans=z.stage != 3, on_backward=inject
    )
    return TrainResult(
        losses,
        first_grads=first if capture else None,
        params=z.full_parameters(),
        extra=dict(
            memory=mem,
            io=getattr(z.optim, "io", None),
            num_params=sum(u.numel for u in z.units),
            padded_params=sum(u.padded for u in z.units),
            scale_history=z.scaler.history if z.scaler else [],
        ),
    )
