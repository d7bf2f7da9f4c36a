"""Data parallelism (DDP) from scratch: bucketed gradient all-reduce, overlapped with backward.

Every rank holds the whole model and a different slice of the global batch. After the
backward pass each gradient is averaged over the N ranks, so every replica takes the same
optimizer step and the replicas stay identical (Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB):

    g = (1/N) Σ_r ∇L_r(w)        one all-reduce of the Ψ gradient elements per step

Cost per rank, with P/G bytes per parameter/gradient element and K bytes of optimizer
state per parameter: memory (P + G + K)Ψ, everything replicated (ZeRO's baseline);
communication one all-reduce of GΨ bytes, i.e. 2(N-1)/N·GΨ on the wire (a ring all-reduce
is a reduce-scatter plus an all-gather: the ZeRO paper's "2Ψ").

Two ideas make it fast (Li et al. Sec. 3.2):
* Buckets. One all-reduce per parameter pays the latency α thousands of times; one for
  the whole model cannot start before backward ends. Gradients are packed, in reverse
  registration order (about the order backward produces them), into buckets of about
  `bucket_mb` MiB, and each bucket is reduced as one flat tensor.
* Overlap. A hook fires when a parameter's gradient has been accumulated; when a bucket's
  last gradient lands, its all-reduce is launched asynchronously while backward continues
  on earlier layers (on gloo in gloo's own thread; on a GPU on the communication stream, which
  waits for the compute stream to have produced the bucket and is waited for, on the device,
  before the optimizer reads it: see `minipar.streams`). Buckets launch strictly in order, so every rank issues the same
  collectives in the same order (gloo and NCCL both require it).
Gradients live inside the bucket buffers (torch's gradient_as_bucket_view): `p.grad` is a
view, so there is no copy in or out and no second Ψ of memory.

`no_sync()` skips the communication of a micro-batch during gradient accumulation: the
gradients add up locally in the buffers and only the last micro-batch's backward reduces.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm, trace
from .mesh import get_mesh
from .model import GPT, GPTConfig, SyntheticData, make_optimizer
from .recompute import apply_recompute
from .result import TrainResult
from .runtime import device

__all__ = ["DDP", "default_group", "held_bytes", "local_batch", "check_batch", "train_steps", "train_ddp"]


def default_group(group=None):
    """The data-parallel group: `group` if given, else the mesh's "dp" axis, else the world."""
    if group is not None:
        return group
    mesh = get_mesh()
    return "dp" if mesh is not None and "dp" in mesh.axes else None


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`: a view and its base count once,
    a freed storage (resized to 0) counts 0. This is what a rank really holds."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


def check_batch(batch_size: int, dp: int, grad_accum: int = 1) -> None:
    """A global batch must split evenly into dp ranks x grad_accum micro-batches."""
    if batch_size % (dp * grad_accum):
        raise ValueError(
            f"batch_size={batch_size} must divide by dp x grad_accum = {dp} x {grad_accum}; "
            f"use a batch_size that is a multiple of {dp * grad_accum}"
        )


def local_batch(data: SyntheticData, step: int, batch_size: int, group=None):
    """This rank's rows of global batch `step` (rank r of N takes the r-th contiguous slice)."""
    x, y = data.batch(step, batch_size)
    n, r = comm.size(group), comm.local_rank(group)
    return x.chunk(n)[r], y.chunk(n)[r]


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.buffer = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        self.views, off = [], 0
        for p in params:
            self.views.append(self.buffer[off : off + p.numel()].view_as(p))
            off += p.numel()
        self.ready, self.handle, self.sent = 0, None, None


class DDP(nn.Module):
    """Wrap `module` for data parallelism over `group` (default: the mesh's "dp" axis or the world).

    Use `ddp.zero_grad()` (never `optimizer.zero_grad(set_to_none=True)`: the gradients
    are views into the buckets) and `with ddp.no_sync():` for all but the last micro-batch.
    `reduce_dtype` (e.g. torch.bfloat16) sends the gradients in a smaller dtype."""

    def __init__(
        self,
        module: nn.Module,
        group=None,
        bucket_mb: float = 25.0,
        reduce_dtype=None,
        broadcast_params: bool = True,
    ):
        super().__init__()
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0 (MiB per bucket), got {bucket_mb}")
        self.module, self.group, self.reduce_dtype = module, default_group(group), reduce_dtype
        params = [p for p in module.parameters() if p.requires_grad]
        # Reverse registration order: backward produces the last layers' gradients first.
        self.buckets, current, size = [], [], 0
        for p in reversed(params):
            if current and (
                size + p.numel() * p.element_size() > bucket_mb * 2**20 or p.dtype != current[0].dtype
            ):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        for i, b in enumerate(self.buckets):
            for p, v in zip(b.params, b.views):
                p.grad = v
                p.register_post_accumulate_grad_hook(self._hook(i, v))
        if broadcast_params:  # replicas must start equal; rank 0 of the group decides
            self._broadcast_from_first_rank(params)
        self.sync, self._next, self._queued = True, 0, False

    @torch.no_grad()
    def _broadcast_from_first_rank(self, params):
        pg, _, n = comm.resolve(self.group)
        if n == 1:
            return
        src = dist.get_global_rank(pg, 0) if pg is not None else 0
        flat = torch.cat([p.detach().flatten() for p in params])
        comm.broadcast(flat, src=src, group=self.group)
        for p, v in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally: the backward passes inside communicate nothing."""
        old, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = old

    def _hook(self, i: int, view: torch.Tensor):
        def hook(p):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                raise RuntimeError(
                    "a DDP gradient is no longer its bucket view: call ddp.zero_grad(), "
                    "not optimizer.zero_grad(set_to_none=True)"
                )
            if not self.sync:
                return
            if not self._queued:  # runs once the whole backward pass has finished
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
                self._queued = True
            self.buckets[i].ready += 1
            self._launch_ready()

        return hook

    def _launch_ready(self, force: bool = False):
        while self._next < len(self.buckets) and (
            force or self.buckets[self._next].ready == len(self.buckets[self._next].params)
        ):
            b = self.buckets[self._next]
            b.sent = b.buffer if self.reduce_dtype is None else b.buffer.to(self.reduce_dtype)
            b.handle = comm.all_reduce(b.sent, op="avg", group=self.group, async_op=True)
            self._next += 1

    def _finish(self):
        self._launch_ready(force=True)  # buckets with unused parameters go now
        for b in self.buckets:
            b.handle.wait()
            if b.sent is not b.buffer:
                b.buffer.copy_(b.sent)
            b.ready, b.handle, b.sent = 0, None, None
        self._next, self._queued = 0, False

    def zero_grad(self):
        for b in self.buckets:
            b.buffer.zero_()

    def backward(self, loss: torch.Tensor):
        loss.backward()

    def step(self, optimizer):
        optimizer.step()

    def model_state_bytes(self, optimizer) -> dict:
        """Bytes held on this rank: parameters, gradients (the buckets), optimizer state
        (tensors as large as their parameter: Adam's two moments). AdamW's per-tensor
        `step` counters are scalars, reported apart as `optimizer_scalars`."""
        params = list(self.module.parameters())
        big = [
            v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        small = [
            v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() == 0
        ]
        return dict(
            params=held_bytes(params),
            grads=held_bytes(b.buffer for b in self.buckets),
            optimizer=held_bytes(big),
            optimizer_scalars=sum(v.numel() * v.element_size() for v in small),
        )


def train_steps(
    engine,
    step_fn,
    cfg: GPTConfig,
    steps: int,
    batch_size: int,
    seed: int = 0,
    grad_accum: int = 1,
    spans: bool = True,
    on_backward=None,
) -> list[float]:
    """The data-parallel training loop shared by DDP and ZeRO: the step loss, identical on every rank.

    `engine` gives zero_grad(), no_sync(), backward(loss) and is callable as the model;
    `step_fn()` takes the optimizer step. `on_backward(step)` runs after the last backward
    (tests use it to inject an overflow)."""
    group = getattr(engine, "group", None)
    check_batch(batch_size, comm.size(group), grad_accum)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    losses = []
    for step in range(steps):
        x, y = (t.to(device()) for t in local_batch(data, step, batch_size, group))
        engine.zero_grad()
        total = torch.zeros((), device=device())
        for i, (xm, ym) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum))):
            with engine.no_sync() if i < grad_accum - 1 else nullcontext():
                with trace.span("F") if spans else nullcontext():
                    _, loss = engine(xm, ym)
                with trace.span("B") if spans else nullcontext():
                    engine.backward(loss / grad_accum)
            total += loss.detach().float() / grad_accum
        if on_backward is not None:
            on_backward(step)
        with trace.span("opt"):
            step_fn()
        with trace.enabled(False):  # the logged loss is not part of the algorithm's traffic
            losses.append(comm.all_reduce(total, op="avg", group=group).item())
        trace.resolve()  # .item() waited for the step anyway: read its device timestamps now (GPU)
    return losses


def train_ddp(
    cfg: GPTConfig,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    grad_accum: int = 1,
    recompute=None,
    group=None,
    bucket_mb: float = 25.0,
    reduce_dtype=None,
    **optim,
) -> TrainResult:
    """Run on every rank: DDP training of the reference GPT. Returns losses, the first step's
    averaged gradients, the final parameters and the model-state bytes of this rank (measured
    before the last step). `optim`: overrides of `make_optimizer` (kind="sgd" for parity tests)."""
    torch.manual_seed(seed)
    model = GPT(cfg, seed).to(device())
    if recompute:
        apply_recompute(model, recompute)
    with trace.enabled(False):  # the trace holds the training steps, not the setup broadcast
        ddp = DDP(model, group=group, bucket_mb=bucket_mb, reduce_dtype=reduce_dtype)
    opt = make_optimizer(model.parameters(), **optim)
    mem, grads = {}, {}

    def step():
        mem.update(ddp.model_state_bytes(opt))
        if not grads:  # the first step's gradients, as the optimizer sees them (averaged)
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()

    losses = train_steps(ddp, step, cfg, steps, batch_size, seed, grad_accum)
    return TrainResult(
        losses,
        first_grads=grads,
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        extra=dict(memory=mem, num_params=sum(p.numel() for p in model.parameters())),
    )
