"""Checkers for the tensor- and sequence-parallel notebooks (03, 04).

tp_mlp: write Megatron's parallel MLP from shards,
    parallel_mlp(x, fc_w, fc_b, proj_w, proj_b, group) -> y
    x: [b, s, h] (the same on every rank); fc_w, fc_b: this rank's rows of fc (column
    parallel); proj_w: this rank's columns of proj (row parallel); proj_b: the full bias.
sp_mlp: the same MLP under sequence parallelism,
    sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group) -> y_shard
    x_shard, y_shard: [b, s/t, h], this rank's chunk of the sequence.
Both run on 2 and 4 simulated ranks against the reference MLP: output, input gradient and
every parameter gradient; sp_mlp must also communicate exactly what SP prescribes. The
package's own parallel layers are disabled while the student's code runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import Mesh, trace
from ..mappings import gather_linear
from ..model import GPT, GPTConfig
from ..tp import ColumnParallelLinear, ParallelMLP, RowParallelLinear, column_parallel
from . import Case, Exercise, compare, exercise, student

CFG = GPTConfig(vocab=64, seq=8, layers=1, heads=4, hidden=16)
B = 2


def _reference(seed=5):
    mlp = GPT(CFG, seed=3).blocks[0].mlp
    with torch.no_grad():  # biases start at zero; make them count, so a bias added t times shows
        for b in (mlp.fc.bias, mlp.proj.bias):
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())))
    x = torch.randn(B, CFG.seq, CFG.hidden, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    dy = torch.randn(B, CFG.seq, CFG.hidden, generator=torch.Generator().manual_seed(seed + 1))
    mlp(x).backward(dy)
    grads = {n: p.grad for n, p in mlp.named_parameters()}
    return mlp, x, dy, mlp(x).detach(), grads


def _cases(rng):
    seed = rng.randint(7, 10_000)
    return [
        Case("2 ranks", (5,), world_size=2),
        Case("4 ranks", (5,), world_size=4),
        Case(f"random case: 2 ranks, inputs from seed {seed}", (seed,), world_size=2, random=True),
    ]


def _rank(solution, case, sp):
    (seed,) = case.args
    Mesh(tp=dist.get_world_size())
    t, r = dist.get_world_size(), dist.get_rank()
    mlp, x_full, dy, _, _ = _reference(seed)
    shard = {
        "fc.weight": (mlp.fc.weight, 0),
        "fc.bias": (mlp.fc.bias, 0),
        "proj.weight": (mlp.proj.weight, 1),
        "proj.bias": (mlp.proj.bias, None),
    }
    params = {
        n: torch.nn.Parameter((w if d is None else w.chunk(t, d)[r]).detach().clone())
        for n, (w, d) in shard.items()
    }
    x = x_full.detach().clone()
    if sp:
        x, dy = x.chunk(t, 1)[r].clone(), dy.chunk(t, 1)[r]
    x.requires_grad_(True)
    trace.reset()
    y = student(
        solution, x, params["fc.weight"], params["fc.bias"], params["proj.weight"], params["proj.bias"], "tp"
    )
    if not isinstance(y, torch.Tensor) or y.shape != dy.shape:
        return {
            "bad": f"returned {type(y).__name__} of shape {tuple(getattr(y, 'shape', ()))}, expected a tensor "
            f"of shape {tuple(dy.shape)}"
        }
    student(y.backward, dy)  # the backward runs the student's autograd functions too
    ops = sorted(e.name for e in trace.events() if e.cat == "comm")
    return {"y": y.detach(), "dx": x.grad, "grads": {n: p.grad for n, p in params.items()}, "ops": ops}


def _judge(case, out, sp):
    _, x, _, y_ref, g_ref = _reference(case.args[0])
    t = len(out)
    if "bad" in out[0]:
        return (out[0]["bad"], "return the MLP's output on this rank")
    cat = (lambda k: torch.cat([o[k] for o in out], 1)) if sp else (lambda k: out[0][k])
    if err := compare(cat("y"), y_ref, "the output"):
        return (
            err,
            "sum the row-parallel partial outputs over the ranks (g, or under SP a reduce-scatter), "
            "and add proj's bias once, after the sum",
        )
    if any(o["dx"] is None for o in out) or (err := compare(cat("dx"), x.grad, "the input gradient")):
        return (
            err or "the input has no gradient",
            "each rank's input gradient is a partial sum: enter the region "
            "with f (under SP: gather_along, whose backward reduce-scatters)",
        )
    for n, want in g_ref.items():
        d = {"fc.weight": 0, "fc.bias": 0, "proj.weight": 1}.get(n)
        for r, o in enumerate(out):
            got = o["grads"][n]
            if sp and d is None and got is not None:  # a replicated bias saw s/t tokens: its gradients add up
                got = sum(q["grads"][n] for q in out)
            if got is None or (
                err := compare(
                    got, want if d is None else want.chunk(t, d)[r], f"the gradient of {n}", rank=r
                )
            ):
                return (
                    err or f"{n} on rank {r} has no gradient",
                    "check which shard each rank holds and that the bias is added after the sum",
                )
    if sp:
        want_ops = ["all_gather", "all_gather", "reduce_scatter", "reduce_scatter"]
        if out[0]["ops"] != want_ops:
            return (
                f"right numbers, but the communication was {out[0]['ops']}, expected {want_ops}",
                "an all-reduce then keeping your chunk moves twice the bytes of a reduce-scatter: "
                "use comm.gather_along on the way in and comm.reduce_scatter_along on the way out",
            )
    return None


_FORBIDDEN = (
    ParallelMLP.forward,
    ColumnParallelLinear.forward,
    RowParallelLinear.forward,
    column_parallel,
    gather_linear,
)

exercise(
    Exercise(
        name="tp_mlp",
        notebook="03_tensor_parallel",
        function="parallel_mlp",
        cases=_cases,
        run=lambda solution, case: _rank(solution, case, False),
        judge=lambda case, out: _judge(case, out, False),
        forbidden=_FORBIDDEN,
        deadline=30.0,
        summary="output, input gradient and every parameter gradient match the single-device MLP",
    )
)

exercise(
    Exercise(
        name="sp_mlp",
        notebook="04_sequence_parallel",
        function="sp_mlp",
        cases=_cases,
        run=lambda solution, case: _rank(solution, case, True),
        judge=lambda case, out: _judge(case, out, True),
        forbidden=_FORBIDDEN,
        deadline=30.0,
        summary="output and gradients match the single-device MLP, with one all-gather and one reduce-scatter each way",
    )
)
