"""Checkers for the tensor- and sequence-parallel notebooks (03, 04).

tp_mlp: write Megatron's parallel MLP from shards,
    parallel_mlp(x, fc_w, fc_b, proj_w, proj_b, group) -> y
    x: [b, s, h] (the same on every rank); fc_w, fc_b: this rank's rows of fc (column
    parallel); proj_w: this rank's columns of proj (row parallel); proj_b: the full bias.
sp_mlp: the same MLP under sequence parallelism,
    sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group) -> y_shard
    x_shard, y_shard: [b, s/t, h], this rank's chunk of the sequence.
Both run on 2 simulated ranks against the reference MLP: output, input gradient and
every parameter gradient; sp_mlp must also communicate exactly what SP prescribes.
"""
from __future__ import annotations

import torch

from . import Verdict, checker, compare
from .. import Mesh, launch, trace
from ..model import GPT, GPTConfig

CFG = GPTConfig(vocab=64, seq=8, layers=1, heads=4, hidden=16)
B = 2


def _reference():
    mlp = GPT(CFG, seed=3).blocks[0].mlp
    with torch.no_grad():  # biases start at zero; make them count, so a bias added t times shows
        for b in (mlp.fc.bias, mlp.proj.bias):
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())))
    x = torch.randn(B, CFG.seq, CFG.hidden, generator=torch.Generator().manual_seed(5), requires_grad=True)
    dy = torch.randn(B, CFG.seq, CFG.hidden, generator=torch.Generator().manual_seed(6))
    mlp(x).backward(dy)
    grads = {n: p.grad for n, p in mlp.named_parameters()}
    return mlp, x, dy, mlp(x).detach(), grads


def _rank(solution, sp):
    import torch.distributed as dist
    Mesh(tp=dist.get_world_size())
    t, r = dist.get_world_size(), dist.get_rank()
    mlp, x_full, dy, _, _ = _reference()
    shard = {"fc.weight": (mlp.fc.weight, 0), "fc.bias": (mlp.fc.bias, 0), "proj.weight": (mlp.proj.weight, 1),
             "proj.bias": (mlp.proj.bias, None)}
    params = {n: torch.nn.Parameter((w if d is None else w.chunk(t, d)[r]).detach().clone())
              for n, (w, d) in shard.items()}
    x = x_full.detach().clone()
    if sp:
        x, dy = x.chunk(t, 1)[r].clone(), dy.chunk(t, 1)[r]
    x.requires_grad_(True)
    trace.reset()
    y = solution(x, params["fc.weight"], params["fc.bias"], params["proj.weight"], params["proj.bias"], "tp")
    y.backward(dy)
    ops = sorted(e.name for e in trace.events() if e.cat == "comm")
    return {"y": y.detach(), "dx": x.grad, "grads": {n: p.grad for n, p in params.items()}, "ops": ops}


def _judge(solution, sp: bool) -> Verdict:
    mlp, x, _, y_ref, g_ref = _reference()
    out = launch(_rank, 2, solution, sp)
    t = len(out)
    cat = (lambda k: torch.cat([o[k] for o in out], 1)) if sp else (lambda k: out[0][k])
    if (err := compare(cat("y"), y_ref, "the output")):
        hint = ("sum the row-parallel partial outputs over the ranks (g, or under SP a reduce-scatter), "
                "and add proj's bias once, after the sum")
        return Verdict(False, err, hint)
    if (err := compare(cat("dx"), x.grad, "the input gradient")):
        return Verdict(False, err, "each rank's input gradient is a partial sum: enter the region with f "
                       "(under SP: gather_along, whose backward reduce-scatters)")
    for n, want in g_ref.items():
        d = {"fc.weight": 0, "fc.bias": 0, "proj.weight": 1}.get(n)
        for r, o in enumerate(out):
            got = o["grads"][n]
            if sp and d is None:  # a replicated bias saw s/t tokens: its gradients add up
                got = sum(q["grads"][n] for q in out)
            if (err := compare(got, want if d is None else want.chunk(t, d)[r], f"the gradient of {n}", rank=r)):
                return Verdict(False, err, "check which shard each rank holds and that the bias is added after the sum")
    if sp:
        want_ops = ["all_gather", "all_gather", "reduce_scatter", "reduce_scatter"]
        if out[0]["ops"] != want_ops:
            return Verdict(False, f"right numbers, but the communication was {out[0]['ops']}, expected {want_ops}",
                           "an all-reduce then keeping your chunk moves twice the bytes of a reduce-scatter: "
                           "use comm.gather_along on the way in and comm.reduce_scatter_along on the way out")
    return Verdict(True, f"output, input gradient and all {len(g_ref)} parameter gradients match the "
                   f"single-device MLP on {t} ranks" + (", with one all-gather and one reduce-scatter "
                                                         "each way" if sp else ""))


@checker("tp_mlp")
def check_tp_mlp(solution) -> Verdict:
    """Megatron's MLP: f -> column -> GELU -> row -> g."""
    return _judge(solution, sp=False)


@checker("sp_mlp")
def check_sp_mlp(solution) -> Verdict:
    """The MLP under sequence parallelism: all-gather(s) -> column -> GELU -> row -> reduce-scatter(s)."""
    return _judge(solution, sp=True)
