"""Exercises of notebooks 01 and 02: average the gradients; ZeRO-2's padded gradient shard.

dp_allreduce: `allreduce_gradients(model)` runs on every rank after a backward on that rank's
    slice of the batch and must leave every `p.grad` equal to the average over the ranks, in
    place, via `minipar.comm`: the gradient of one device that saw the whole batch.
zero_shard: `shard_gradient(flat_grad)` gets this rank's full flat gradient (numel not
    necessarily a multiple of N) and returns this rank's shard of the average over ranks: pad
    with zeros to a multiple of N, reduce-scatter, keep rank r's ceil(numel/N) elements
    (ZeRO, Rajbhandari et al. 2020, Sec. 5.2; FSDP pads its FlatParameter the same way).
"""

from __future__ import annotations

import torch

from .. import comm, runtime
from ..dp import DDP, local_batch
from ..model import GPT, GPTConfig, SyntheticData
from ..zero import ZeRO
from . import Case, Exercise, compare, exercise, student

_CFG = dict(vocab=32, seq=8, layers=1, heads=2, hidden=16)


# ----------------------------------------------------------------------------- dp_allreduce
def _dp_cases(rng):
    fixed = [Case(f"{n} ranks, batch 8", (8, 1), world_size=n) for n in (2, 4)]
    seed = rng.randint(2, 10_000)
    return fixed + [
        Case(f"random case: 3 ranks, batch 6, data seed {seed}", (6, seed), world_size=3, random=True)
    ]


def _dp_run(solution, case):
    batch, seed = case.args
    cfg = GPTConfig(**_CFG)
    model = GPT(cfg, seed=1)
    x, y = local_batch(SyntheticData(cfg.vocab, cfg.seq, seed), 0, batch)
    model(x, y)[1].backward()
    student(solution, model)
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}


def _dp_judge(case, outputs):
    batch, seed = case.args
    cfg = GPTConfig(**_CFG)
    ref = GPT(cfg, seed=1)
    x, y = SyntheticData(cfg.vocab, cfg.seq, seed).batch(0, batch)
    ref(x, y)[1].backward()
    for r, got in enumerate(outputs):
        for k, p in ref.named_parameters():
            if got[k] is None:
                return (
                    f"the gradient of {k} on rank {r} is None",
                    "average p.grad in place; don't replace it",
                )
            err = compare(got[k], p.grad, f"gradient of {k}", atol=1e-6, rank=r)
            if err:
                return (
                    err,
                    "each rank's gradient is the mean over its own rows; the global mean is the average "
                    "of those means: all_reduce the sum, then divide by the world size",
                )
    return None


exercise(
    Exercise(
        name="dp_allreduce",
        notebook="01_data_parallel",
        function="allreduce_gradients",
        cases=_dp_cases,
        run=_dp_run,
        judge=_dp_judge,
        forbidden=(comm.all_reduce_grads, DDP._finish, DDP._launch_ready),
        deadline=30.0,
        summary="every rank holds the full-batch gradient",
    )
)


# ----------------------------------------------------------------------------- zero_shard
def _zero_cases(rng):
    fixed = [Case(f"{n} ranks, 10 elements", (10,), world_size=n) for n in (2, 3, 4)]
    drawn = [
        Case(f"random case: {n} ranks, {numel} elements", (numel,), world_size=n, random=True)
        for n, numel in [(rng.randint(2, 5), rng.randint(1, 40)) for _ in range(2)]
    ]
    return fixed + drawn


def _zero_run(solution, case):
    (numel,) = case.args
    r = runtime.rank()
    flat = torch.arange(numel, dtype=torch.float32) * (r + 1) + 0.5
    return student(solution, flat)


def _zero_judge(case, outputs):
    (numel,), n = case.args, case.world_size
    shard = -(-numel // n)
    mean = sum(torch.arange(numel, dtype=torch.float32) * (r + 1) + 0.5 for r in range(n)) / n
    padded = torch.cat([mean, torch.zeros(shard * n - numel)])
    for r, got in enumerate(outputs):
        err = compare(got, padded[r * shard : (r + 1) * shard], "your shard", atol=1e-5, rank=r)
        if err:
            return (
                err,
                "pad to ceil(numel / N) * N, then comm.reduce_scatter(..., op='avg'): every rank gets "
                "the average, and only its own slice",
            )
    return None


exercise(
    Exercise(
        name="zero_shard",
        notebook="02_zero_fsdp",
        function="shard_gradient",
        cases=_zero_cases,
        run=_zero_run,
        judge=_zero_judge,
        forbidden=(ZeRO._reduce_scatter,),
        deadline=20.0,
        summary="padded, reduce-scattered and averaged correctly",
    )
)
