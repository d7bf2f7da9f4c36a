"""Asynchronous PipeDream with weight stashing, and PipeDream-2BW.

PipeDream (Narayanan et al., SOSP 2019) never flushes the pipeline: it runs 1F1B over
an endless stream of micro-batches and updates each stage right after each backward.
Stage s therefore runs micro-batch i's forward on weights W_s^{v(s,i)} that are
several updates old, and by its backward the weights have moved on. *Weight
stashing* keeps the version each forward used and runs that micro-batch's backward
on the same version, so every gradient is a true gradient of some weights:

    W_s^{k+1} = AdamW(W_s^k, grad of micro-batch i's loss at (W_0^{v(0,i)}, ..., W_{p-1}^{v(p-1,i)}))

with v(s,i) = number of updates stage s made before F(s, i). Memory: up to p - s
stashed versions on stage s.

PipeDream-2BW (Narayanan et al., ICML 2021, Sec. 3.1) accumulates the gradients of
`update_every` >= p micro-batches per update, so at most two versions are ever alive
(the "double-buffered weights"): W^{t+1} = W^t - lr * grad f(W^{t-1}).

`pipedream_reference` replays the same version pattern on one device; the tests
require equal losses and weights, and that each backward used its forward's version.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from .. import runtime
from ..model import GPT, GPTConfig, SyntheticData, make_optimizer
from ..result import TrainResult
from .runtime import StepRunner, check_config, loss_fn
from .schedules import Schedule
from .stage import Stage, build_stages, part_ranges
from .validate import validate

__all__ = ["versions_used", "train_pipedream", "pipedream_reference"]


def versions_used(schedule: Schedule) -> dict:
    """{(stage, mb): v}: the weight version F(stage, mb) runs on, read off the schedule."""
    out = {}
    for acts in schedule.actions.values():
        backs = {}
        for a in acts:
            if a.kind == "F":
                out[a.stage, a.mb] = backs.get(a.stage, 0) // schedule.update_every
            elif a.kind in ("B", "I"):
                backs[a.stage] = backs.get(a.stage, 0) + 1
    return out


class StashingRunner(StepRunner):
    """The executor with weight stashing: F runs on a stashed copy of the current version,
    B differentiates that copy, and the live weights update every `update_every` backwards."""

    def __init__(self, schedule, lowered, stages, act_shape, **optim):
        super().__init__(schedule, lowered, stages, act_shape)
        self.loss_scale = 1.0 / schedule.update_every
        self.opt = {s: make_optimizer(st.parameters(), **optim) for s, st in stages.items()}
        self.version = {s: 0 for s in stages}
        self.stash = {s: {} for s in stages}  # stage -> {version: [tensors]}
        self.used, self.backs = {}, {s: 0 for s in stages}
        self.log, self.max_live = [], {s: 0 for s in stages}

    def forward(self, stage, x, mb):
        v, st = self.version[stage], self.stages[stage]
        if v not in self.stash[stage]:  # the live weights are version v until the next update
            self.stash[stage][v] = [p.detach().clone().requires_grad_() for p in st.parameters()]
        self.max_live[stage] = max(self.max_live[stage], len(self.stash[stage]))
        self.used[stage, mb] = v
        self.log.append(("F", stage, mb, v))
        names = [n for n, _ in st.named_parameters()]
        return functional_call(st, dict(zip(names, self.stash[stage][v])), (x,))

    def weights(self, stage, mb):
        v = self.used[stage, mb]
        self.log.append(("B", stage, mb, v))
        return self.stash[stage][v]

    def done_with(self, stage, mb):
        del self.used[stage, mb]
        self.backs[stage] += 1
        if self.backs[stage] % self.sch.update_every == 0:
            self.opt[stage].step()
            self.opt[stage].zero_grad(set_to_none=True)
            self.version[stage] += 1
        alive = {v for (s, _), v in self.used.items() if s == stage} | {self.version[stage]}
        self.stash[stage] = {v: t for v, t in self.stash[stage].items() if v in alive}


def train_pipedream(
    schedule: Schedule, cfg: GPTConfig, mb_size: int = 2, seed: int = 0, **optim
) -> TrainResult:
    """Run under `launch(train_pipedream, p, ...)`: the schedule's m micro-batches as one stream.
    Returns per rank {"losses": {mb: loss}, "params", "log": [(F|B, stage, mb, version)], "max_live"}.
    `optim`: overrides of `make_optimizer` (kind="sgd" for parity tests)."""
    if schedule.update_every is None:
        raise ValueError(
            f"{schedule.name} is synchronous; build 'pipedream' or 'pipedream_2bw' for this runner"
        )
    rank, m = runtime.rank(), schedule.num_microbatches
    check_config(schedule, cfg)
    stages = build_stages(GPT(cfg, seed), schedule, rank)
    runner = StashingRunner(
        schedule, validate(schedule)[rank], stages, lambda mb: (mb_size, cfg.seq, cfg.hidden), **optim
    )
    x, y = SyntheticData(cfg.vocab, cfg.seq, seed).batch(0, m * mb_size)
    runner.run(x.chunk(m), y.chunk(m))
    return TrainResult(
        runner.mb_losses,
        params={n: p.detach().clone() for st in stages.values() for n, p in st.named_parameters()},
        extra=dict(log=runner.log, max_live=runner.max_live),
    )


def pipedream_reference(schedule: Schedule, cfg: GPTConfig, mb_size: int = 2, seed: int = 0, **optim):
    """One device, micro-batch by micro-batch: forward/backward on the versions the pipeline
    would use, then each stage's update. Returns ({mb: loss}, {name: final weight})."""
    check_config(schedule, cfg)
    m, n, ue = schedule.num_microbatches, schedule.num_parts, schedule.update_every
    gpt = GPT(cfg, seed)
    stages = [Stage(gpt, r, k == 0, k == n - 1) for k, r in enumerate(part_ranges(cfg, n))]
    names = [[nm for nm, _ in st.named_parameters()] for st in stages]
    opts = [make_optimizer(st.parameters(), **optim) for st in stages]
    history = [[[p.detach().clone() for p in st.parameters()]] for st in stages]
    v = versions_used(schedule)
    x, y = SyntheticData(cfg.vocab, cfg.seq, seed).batch(0, m * mb_size)
    losses = {}
    for i, (xi, yi) in enumerate(zip(x.chunk(m), y.chunk(m))):
        ws = [[t.clone().requires_grad_() for t in history[s][v[s, i]]] for s in range(n)]
        h = xi
        for s in range(n):
            h = functional_call(stages[s], dict(zip(names[s], ws[s])), (h,))
        loss = loss_fn(h, yi)
        losses[i] = loss.item()
        grads = torch.autograd.grad(loss / ue, [t for w in ws for t in w])
        k = 0
        for s, st in enumerate(stages):
            for p in st.parameters():
                p.grad = grads[k] if p.grad is None else p.grad + grads[k]
                k += 1
            if (i + 1) % ue == 0:
                opts[s].step()
                opts[s].zero_grad(set_to_none=True)
                history[s].append([p.detach().clone() for p in st.parameters()])
    return losses, {nm: p.detach().clone() for st in stages for nm, p in st.named_parameters()}
