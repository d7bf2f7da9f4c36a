"""The executor: one runtime runs any lowered schedule on real ranks.

Each rank holds the stages `schedule.stage_to_rank` gives it, cut from the reference
`GPT(cfg, seed)` by `stage.build_stages` (stage 0 the embeddings, the last stage ln_f + head
+ loss; MoE stages add their load-balancing loss), and walks its lowered action list, one
method per kind (`_forward`, `_backward`, `_weight`):

  F   forward; keep the stage input and output (the stashed activations). With
      recompute=True keep only the input and re-run the forward at backward time
      (GPipe's re-materialization: activation memory per micro-batch O(1 layer input)).
  B   full backward: d loss / d input and d loss / d weights in one pass.
  I   input-gradient only: the linear layers' weight GEMMs are queued as closures in a
      weight-gradient store (`wgrad.py`, DualPipe's WeightGradStore), so the previous
      stage gets its gradient after half the backward's work.
  W   run that micro-batch's queued closures: dW = dyᵀ x for every linear layer.
  SEND_*  comm.isend of an output / input-gradient (never blocks).
  RECV_*  comm.irecv posted ahead; the compute action that needs it waits on it.

The micro-batch losses are cross-entropy / m, so the summed gradients equal the
reference loop's gradient accumulation. DualPipe holds two copies of each layer
slice (stage k and its mirror p+k); their gradients are summed across the two
ranks before the optimizer step, so both copies stay identical.
Every compute action is a `trace.span` named like `0F1`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm, runtime, trace
from ..model import GPT, GPTConfig, SyntheticData, make_optimizer
from ..moe import moe_layers
from ..result import TrainResult
from ..validation import Problems
from .schedules import Schedule
from .stage import build_stages, stage_layer_counts
from .validate import validate
from .wgrad import WeightGradStore, install

__all__ = ["check_config", "StepRunner", "train_pipeline", "loss_fn"]


def check_config(
    schedule: Schedule, cfg: GPTConfig, batch_size: int | None = None, stage_layers=None
) -> None:
    """Raise a ConfigError that says how to fix a configuration the executor cannot run.
    Call it before `launch` (train_pipeline calls it again on every rank)."""
    p = Problems()
    p.merge(stage_layer_counts, cfg, schedule.num_parts, stage_layers)
    m = schedule.num_microbatches
    if batch_size is not None:
        p.integer("batch_size", batch_size, low=1)
        p.divides("num_microbatches", m, "batch_size", batch_size, "each micro-batch gets the same sequences")
    if cfg.experts:  # capacity and the aux loss are per group: each micro-batch holds whole groups
        p.divides(
            "num_microbatches", m, "moe_groups", cfg.moe_groups, "each micro-batch must hold whole groups"
        )
    p.raise_if_any("the pipeline cannot run")


def loss_fn(logits, y):
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


class StepRunner:
    """Runs one step of a lowered action list on this rank.

    Hooks, which PipeDream's weight stashing overrides: `forward(stage, x, mb)`, `weights(stage,
    mb)` (the tensors B differentiates), `accumulate(stage, mb, grads)` and `done_with(stage, mb)`
    (called when a micro-batch's backward on a stage is complete).

    Inside a larger mesh (`minipar.compose`): `rank` is this rank's pipeline index, `peer(r)`
    the global rank of pipeline rank r in this rank's pp `group`, and `loss(logits, y)` the
    loss (e.g. vocab-parallel under TP). By default the world is the pipeline."""

    def __init__(
        self,
        schedule: Schedule,
        lowered: list,
        stages: dict,
        act_shape,
        recompute=False,
        *,
        rank: int | None = None,
        peer=None,
        loss=None,
        group=None,
    ):
        self.sch, self.lowered, self.stages, self.shape, self.recompute = (
            schedule,
            lowered,
            stages,
            act_shape,
            recompute,
        )
        self.rank = runtime.rank() if rank is None else rank
        self.peer, self.loss, self.group = peer or (lambda r: r), loss or loss_fn, group
        self.store = WeightGradStore()
        self.params = {s: list(st.parameters()) for s, st in stages.items()}  # walked once, not per action
        # Route linear layers through the weight-gradient store only if the schedule splits B
        # into I and W: the custom backward costs Python overhead that plain B does not need.
        self.split = {(a.stage, a.mb) for a in lowered if a.kind == "I"}  # whose backward is I then W
        split = bool(self.split)
        self.eager = {
            s: install(st, self.store) if split else list(st.parameters()) for s, st in stages.items()
        }
        self.loss_scale = 1.0 / schedule.num_microbatches  # the mean over micro-batches, as the reference

    # ---- hooks PipeDream overrides
    def forward(self, stage, x, mb):
        return self.stages[stage](x)

    def weights(self, stage, mb):
        return self.params[stage]

    def accumulate(self, stage, mb, grads):
        """Add the gradients of `weights(stage, mb)` (when they are not the live parameters)."""
        for p, g in zip(self.params[stage], grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    # ---- one step
    def run(self, xs, ys) -> float:
        """Execute the lowered list once; returns the sum of the micro-batch losses computed here."""
        dev = runtime.device()
        self.inp, self.out, self.local, self.dx = {}, {}, {}, {}
        self.xs, self.ys, self.loss_sum, self.mb_losses = xs, ys, 0.0, {}
        self.aux_sum, self.aux_out = 0.0, {}  # MoE stages' load-balancing losses (scaled by 1/m)
        recvs, sends, posted, early = {}, [], {}, {}
        for a in self.lowered:
            if a.kind.startswith("RECV"):
                k = posted[a.peer] = posted.get(a.peer, -1) + 1  # k-th receive from this peer
                h = comm.irecv(torch.empty(self.shape(a.mb), device=dev), self.peer(a.peer), group=self.group)
                recvs[a.kind[-1], a.stage, a.mb] = (h, (a.peer, k))
            elif a.kind.startswith("SEND"):
                key = (a.stage, a.mb)
                if a.kind == "SEND_B":
                    t = self.dx.pop(key)
                else:  # with recompute the output is not kept past its send
                    t = self.out.pop(key) if self.recompute else self.out[key]
                sends.append(comm.isend(t.detach().contiguous(), self.peer(a.peer), group=self.group))
            else:
                # Wait for the input outside the span, so waiting shows as idle, not compute. The F
                # of an F&B pair also waits for its partner's input: the pair starts as one unit.
                got, src = self._receive(a, recvs)
                srcs = [src] if src else []
                if a in self.sch.overlapped:  # DualPipe's F&B pairs: F -> its B
                    b = self.sch.overlapped[a]
                    early[b] = self._receive(b, recvs)
                    srcs += [early[b][1]] if early[b][1] else []
                elif a in early:
                    got, _ = early.pop(a)
                # `recv` names the messages this action waited for, so the modeled clock (sim.retime)
                # knows what it waited for.
                with trace.span(
                    str(a), stage=a.stage, mb=a.mb, kind=a.kind, **({"recv": srcs} if srcs else {})
                ):
                    self.compute(a, got)
            for h in sends:  # close the sends that have gone out (ends their trace spans)
                if h.work.is_completed():
                    h.wait()
            sends = [h for h in sends if not h.done]
        for h in sends:
            h.wait()
        if len(self.store) or recvs:
            raise RuntimeError(
                f"rank {self.rank}: the schedule left work undone: W of {list(self.store.pending)}, "
                f"receives {list(recvs)}"
            )
        return self.loss_sum

    def _receive(self, a, recvs):
        """(a's input tensor or None, (peer, k) of the message it came in, or None)."""
        path = self.sch.paths[a.mb]
        need = {"F": "F", "B": "B", "I": "B"}.get(a.kind)
        if need is None or a.stage == (path[0] if need == "F" else path[-1]):
            return None, None
        h, src = recvs.pop((need, a.stage, a.mb), (None, None))
        return (h.wait(), src) if h is not None else (self.local.pop((need, a.stage, a.mb), None), None)

    def compute(self, a, got):
        """One compute action, by kind (DualPipe names the same phases _forward_chunk and
        _backward_chunk; the W store is its WeightGradStore)."""
        {"F": self._forward, "B": self._backward, "I": self._backward, "W": self._weight}[a.kind](a, got)

    def _forward(self, a, got):
        """F: run the stage on the received activation (or the micro-batch's tokens on the first
        stage), keep input and output for backward, hand the output on. The last stage's output
        is its loss / m; an MoE stage's aux loss is kept for its backward."""
        key, path = (a.stage, a.mb), self.sch.paths[a.mb]
        first, last = path[0] == a.stage, path[-1] == a.stage
        x = self.xs[a.mb].to(runtime.device()) if first else got.detach().requires_grad_()
        with torch.no_grad() if self.recompute else contextlib.nullcontext():
            y, aux = self._run_stage(a, x, last)
            if last:
                self.mb_losses[a.mb] = y.item() / self.loss_scale
                self.loss_sum += y.item()
            if aux is not None:
                self.aux_sum += aux.item()
                if last:
                    y = y + aux
                else:
                    self.aux_out[key] = aux
        self.inp[key], self.out[key] = x, y
        nxt = self.sch.next_stage(a.stage, a.mb)
        if nxt is not None and self.sch.stage_to_rank[nxt] == self.rank:
            self.local["F", nxt, a.mb] = y.detach()
        if self.recompute and (nxt is None or self.sch.stage_to_rank[nxt] == self.rank):
            del self.out[key]  # else kept only until its SEND

    def _backward(self, a, dy):
        """B (input and weight gradients in one pass) or I (input gradient now, the linear
        layers' weight GEMMs queued in the W store); the input gradient goes to the previous stage."""
        key, path = (a.stage, a.mb), self.sch.paths[a.mb]
        first, last = path[0] == a.stage, path[-1] == a.stage
        x, y, aux = self.inp.pop(key), self.out.pop(key, None), self.aux_out.pop(key, None)
        if self.recompute:  # re-materialize the stage's activations from its input
            y, aux = self._run_stage(a, x, last)
            if aux is not None and last:
                y, aux = y + aux, None
        g = dy
        if aux is not None:  # an MoE stage's load-balancing loss starts its own backward here
            y, g = [y, aux], [dy, torch.ones_like(aux)]
        if a.kind == "B":
            # backward() accumulates into .grad (in C++, and firing ZeRO-2/3's gradient hooks);
            # `inputs` keeps it to this stage, so x.grad is what the previous stage waits for
            ws = self.weights(a.stage, a.mb)
            torch.autograd.backward(y, g, inputs=([] if first else [x]) + ws)
            dx = None if first else x.grad
            if ws is not self.params[a.stage]:  # stashed copies (PipeDream): pass their gradients on
                self.accumulate(a.stage, a.mb, [w.grad for w in ws])
                for w in ws:
                    w.grad = None
            self.done_with(a.stage, a.mb)
        else:
            with self.store.defer(key):
                grads = torch.autograd.grad(y, ([] if first else [x]) + self.eager[a.stage], g)
            dx = None if first else grads[0]
            for p, gp in zip(self.eager[a.stage], grads[0 if first else 1 :]):
                p.grad = gp if p.grad is None else p.grad + gp
        if dx is not None:
            prev = self.sch.prev_stage(a.stage, a.mb)
            if self.sch.stage_to_rank[prev] == self.rank:
                self.local["B", prev, a.mb] = dx
            else:
                self.dx[key] = dx

    def _weight(self, a, _):
        """W: run the micro-batch's queued weight GEMMs, dW = dyᵀ x for every linear layer."""
        self.store.flush((a.stage, a.mb))
        self.done_with(a.stage, a.mb)

    def _run_stage(self, a, x, last):
        """The stage's output (the scaled loss on the last stage) and its scaled auxiliary loss
        (MoE load balancing: a stage module with `aux_loss()`), or None."""
        self.store.record = (a.stage, a.mb) in self.split  # only an I needs the store's linear layers
        y = self.forward(a.stage, x, a.mb)
        if last:
            y = self.loss(y, self.ys[a.mb].to(y.device)) * self.loss_scale
        aux_of = getattr(self.stages[a.stage], "aux_loss", None)
        aux = aux_of() if aux_of is not None else None
        if aux is not None and not (torch.is_tensor(aux) and aux.requires_grad):
            aux = None  # a dense stage: nothing to backpropagate
        return y, (aux * self.loss_scale if aux is not None else None)

    def done_with(self, stage, mb):
        """Called when (stage, mb)'s backward is complete (PipeDream updates weights here)."""


def _mirror_groups(schedule):
    """DualPipe: the process group {r, p-1-r} of each pair of ranks that hold the same layers."""
    p = schedule.num_ranks
    groups = {}
    for r in range(p // 2):
        g = dist.new_group([r, p - 1 - r])
        groups[r] = groups[p - 1 - r] = g
    return groups


def train_pipeline(
    schedule: Schedule,
    cfg: GPTConfig,
    steps: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    recompute: bool = False,
    stage_layers=None,
    **optim,
) -> TrainResult:
    """Run under `minipar.launch(train_pipeline, p, ...)`: `steps` AdamW steps on the reference data
    (`optim`: overrides of `make_optimizer`, e.g. kind="sgd" for parity tests).

    Returns per rank {"losses": this rank's share of each step's loss (sum over ranks = the
    step loss), "first_grads" and "grads": {name: the first and the last step's gradient},
    "params": {name: final value}, "times": seconds per step, "events": this rank's trace}."""
    rank, n_events = runtime.rank(), len(trace.events())
    if runtime.world_size() != schedule.num_ranks:
        raise ValueError(f"schedule is for {schedule.num_ranks} ranks, launched on {runtime.world_size()}")
    check_config(schedule, cfg, batch_size, stage_layers)
    m = schedule.num_microbatches
    lowered = validate(schedule)[rank]
    gpt = GPT(cfg, seed)
    for layer in moe_layers(gpt):  # each micro-batch's forward holds moe_groups/m whole groups
        layer.groups = cfg.moe_groups // m
    stages = {s: st.to(runtime.device()) for s, st in build_stages(gpt, schedule, rank, stage_layers).items()}
    mirror = _mirror_groups(schedule) if schedule.name == "dualpipe" else None
    opt = make_optimizer([p for st in stages.values() for p in st.parameters()], **optim)
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    runner = StepRunner(
        schedule, lowered, stages, lambda mb: (batch_size // m, cfg.seq, cfg.hidden), recompute
    )
    losses, grads, first, times = [], {}, {}, []
    for step in range(steps):
        t0 = runtime.wall()
        x, y = data.batch(step, batch_size)
        opt.zero_grad(set_to_none=True)
        losses.append(runner.run(x.chunk(m), y.chunk(m)) + runner.aux_sum)
        if mirror is not None:  # sum the two copies' gradients, ordered by layer slice on both ranks
            ps = [p for s in sorted(stages, key=lambda s: schedule.part[s]) for p in stages[s].parameters()]
            comm.all_reduce_grads(ps, group=mirror[rank])
        grads = {n: p.grad.clone() for st in stages.values() for n, p in st.named_parameters()}
        first = first or grads
        opt.step()
        times.append(runtime.wall() - t0)
    params = {n: p.detach().clone() for st in stages.values() for n, p in st.named_parameters()}
    return TrainResult(
        losses,
        first_grads=first,
        grads=grads,
        params=params,
        extra=dict(times=times, events=trace.events()[n_events:]),
    )
