"""Our TP(+SP) against torch's DTensor tensor parallelism, on the same model and ranks.

    python -m minipar.bench.tp [--tp 2] [--dp 1] [--steps 12] [--layers 2] [--hidden 128]

torch's version: `parallelize_module` with ColwiseParallel (q, k, v, fc, head),
RowwiseParallel (proj), SequenceParallel (LayerNorms) and `loss_parallel` (the
vocab-parallel cross-entropy), the torchtitan recipe applied to minipar's GPT.
Both train the same reference weights on the same batches; the command checks
that the losses agree to 1e-5 and prints the median step-time ratio (ours / torch)
and the peak resident memory of rank 0 (CPU: the process's max RSS).

With --dp > 1 both sides also shard over dp, torchtitan's 2D: ours is `minipar.train --zero 3`'s
model and optimizer (ComposedStage + optim.Optimizer), torch's is FSDP2 `fully_shard` per block
on the dp sub-mesh of a 2-D DeviceMesh over the DTensor-parallel model.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from .. import Mesh, launch
from ..compose import ParallelConfig, build_stages, loss_of
from ..mappings import sync_sequence_parallel_grads
from ..model import GPT, GPTConfig, SyntheticData, make_optimizer
from ..optim import Optimizer
from ..runtime import device
from ..tp import TPGPT, check_tp
from ..validation import ArgumentParser, Int, Problems, exit_on_error


def dtensor_tp_model(cfg: GPTConfig, seed: int = 0, sequence_parallel: bool = False, mesh=None) -> GPT:
    """The reference GPT parallelized by DTensor over `mesh` (default: every rank; call inside
    `launch`). Its forward(idx) returns [b, s, V] logits as a DTensor sharded on the vocab."""

    mesh = mesh if mesh is not None else init_device_mesh(device().type, (dist.get_world_size(),))
    model = GPT(cfg, seed).to(device())
    act = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    plan = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(input_layouts=act, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:  # wpe is added to the full sequence, so split after the embedding
        plan["blocks.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
        plan["ln_f"] = SequenceParallel()
    for i in range(cfg.layers):
        blk = {
            "attn": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=act),
            "mlp.fc": ColwiseParallel(input_layouts=act),
            "mlp.proj": RowwiseParallel(output_layouts=act),
        }
        if sequence_parallel:
            blk.update({"ln1": SequenceParallel(), "ln2": SequenceParallel()})
        plan.update({f"blocks.{i}.{k}": v for k, v in blk.items()})
    return parallelize_module(model, mesh, plan)


def dtensor_loss(logits, targets):
    """torch's vocab-parallel cross-entropy: F.cross_entropy on a vocab-sharded DTensor."""
    with loss_parallel():
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _run(cfg, steps, batch_size, sp, ours):
    torch.manual_seed(0)
    if ours:
        Mesh(tp=dist.get_world_size())
        model = TPGPT(GPT(cfg, 0), "tp", sp).to(device())
    else:
        model = dtensor_tp_model(cfg, 0, sp)
    opt = make_optimizer(model.parameters())
    data = SyntheticData(cfg.vocab, cfg.seq, 0)
    losses, times = [], []
    for step in range(steps):
        x, y = (t.to(device()) for t in data.batch(step, batch_size))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if ours:
            _, loss = model(x, y)
            loss.backward()
            if sp:
                sync_sequence_parallel_grads(model)
        else:
            loss = dtensor_loss(model(x), y)
            with loss_parallel():
                loss.backward()
        opt.step()
        losses.append(loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item())
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"losses": losses, "median": statistics.median(times[2:]), "peak": peak}


def _run_2d(cfg, steps, batch_size, sp, ours, dp, tp):
    """ZeRO-3 over dp beside TP over tp (tp = consecutive ranks on both sides)."""
    torch.manual_seed(0)
    if ours:
        pc = ParallelConfig(dp=dp, tp=tp, sp=sp, zero=3)
        mesh = Mesh(**pc.axes())
        model = build_stages(cfg, pc, mesh, 0)[0].to(device())
        opt = Optimizer(list(model.named_parameters()), pc, module=model)
        d = mesh.index("dp")
    else:
        m2 = init_device_mesh(device().type, (dp, tp), mesh_dim_names=("dp", "tp"))
        model = dtensor_tp_model(cfg, 0, sp, mesh=m2["tp"])
        for blk in model.blocks:
            fully_shard(blk, mesh=m2["dp"])
        fully_shard(model, mesh=m2["dp"])
        opt, d = make_optimizer(model.parameters()), m2["dp"].get_local_rank()
    data = SyntheticData(cfg.vocab, cfg.seq, 0)
    losses, times, grads = [], [], {}
    for step in range(steps):
        x, y = (t.chunk(dp)[d].to(device()) for t in data.batch(step, batch_size))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        if ours:
            loss = loss_of(model(x), y, pc)
            loss.backward()
        else:
            loss = dtensor_loss(model(x), y)
            with loss_parallel():
                loss.backward()
            loss = loss.full_tensor()
            if step == 0:  # the first step's gradients, gathered to full shape (parity tests)
                grads = {n: p.grad.full_tensor().detach().cpu() for n, p in model.named_parameters()}
        opt.step()
        times.append(time.perf_counter() - t0)
        total = loss.detach().reshape(1).clone()
        dist.all_reduce(total)
        losses.append(total.item() / (dp * tp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"losses": losses, "median": statistics.median(times[2:]), "peak": peak, "grads": grads}


@exit_on_error
def main(argv=None):
    ap = ArgumentParser(
        prog="python -m minipar.bench.tp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tp", type=Int, default=2, help="tensor-parallel ranks [2]")
    ap.add_argument("--dp", type=Int, default=1, help="also shard over dp: ZeRO-3 vs FSDP2 (world dp*tp) [1]")
    ap.add_argument("--steps", type=Int, default=12, help="steps; the median leaves out the first two [12]")
    ap.add_argument("--batch", type=Int, default=8, help="global batch [8]")
    ap.add_argument("--layers", type=Int, default=2, help="transformer blocks [2]")
    ap.add_argument("--hidden", type=Int, default=128, help="model width, a multiple of the 8 heads [128]")
    ap.add_argument("--seq", type=Int, default=64, help="sequence length [64]")
    a = ap.parse_args(argv)
    p = Problems(cli=True)
    ok = all([p.integer(f, getattr(a, f), low=1) for f in ("tp", "dp", "batch", "layers", "hidden", "seq")])
    p.integer("steps", a.steps, low=3, why="the median leaves out the first two steps")
    if ok:
        p.divides("dp", a.dp, "batch", a.batch, "every data-parallel rank gets the same sequences")
        p.divides("heads", 8, "hidden", a.hidden, "the benchmark's model has 8 heads")
    p.raise_if_any()
    cfg = GPTConfig(vocab=256, seq=a.seq, layers=a.layers, heads=8, hidden=a.hidden)
    check_tp(cfg, a.tp, sequence_parallel=True)
    print(f"{cfg}\ntp={a.tp}, dp={a.dp}, batch={a.batch}, {a.steps} steps (median of the last {a.steps - 2})")
    print(
        f"{'':<11}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}{'ours MB':>10}{'torch MB':>10}{'max |dloss|':>13}"
    )
    ratios = {}
    run = (
        (lambda sp, ours: launch(_run, a.tp, cfg, a.steps, a.batch, sp, ours, timeout=300)[0])
        if a.dp == 1
        else (
            lambda sp, ours: launch(
                _run_2d, a.dp * a.tp, cfg, a.steps, a.batch, sp, ours, a.dp, a.tp, timeout=300
            )[0]
        )
    )
    for sp in (False, True):
        ours, theirs = run(sp, True), run(sp, False)
        err = max(abs(x - y) for x, y in zip(ours["losses"], theirs["losses"]))
        ratios[sp] = ours["median"] / theirs["median"]
        print(
            f"{('FSDP+' if a.dp > 1 else '') + ('TP+SP' if sp else 'TP'):<11}"
            f"{ours['median'] * 1e3:>10.2f}{theirs['median'] * 1e3:>10.2f}"
            f"{ratios[sp]:>8.2f}{ours['peak'] / 2**20:>10.0f}{theirs['peak'] / 2**20:>10.0f}{err:>13.2e}"
        )
        if err > 1e-5:
            raise SystemExit(f"losses disagree by {err:.3g} (> 1e-5)")
    return ratios


if __name__ == "__main__":
    rc = main()  # 2 for a refused command line; the results otherwise
    sys.exit(rc if isinstance(rc, int) else 0)
