"""Our DDP and ZeRO-3 against torch's: `python -m minipar.bench.dp [--world 2] [--steps 15]`.

Pairs, same model, seed, batch and world size, on gloo (CPU) or NCCL (under torchrun):
  DDP                ours  vs  torch.nn.parallel.DistributedDataParallel
  ZeRO-3             ours  vs  FSDP2 fully_shard (each block, then the root)
  ZeRO-3 + offload   ours  vs  FSDP2 fully_shard with CPUOffloadPolicy(pin_memory=False)
Prints the median step time (slowest rank per step) and the ratio ours / torch, and the peak
memory per rank: on a GPU torch.cuda.max_memory_allocated; on the CPU the growth of the
process's peak resident set (ru_maxrss) over the run, which counts whole pages and the allocator's
caches, so read it to the MiB, not the byte. Each variant runs in its own processes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .. import comm, runtime
from ..dp import DDP, local_batch
from ..model import GPT, GPTConfig, SyntheticData, make_optimizer
from ..validation import ArgumentParser, Int, Problems, exit_on_error
from ..zero import ZeRO

CFG = GPTConfig(vocab=256, seq=64, layers=4, heads=4, hidden=256)
PAIRS = [
    ("DDP", "ours_ddp", "torch_ddp"),
    ("ZeRO-3 / FSDP2", "ours_zero3", "fsdp2"),
    ("ZeRO-3 + offload", "ours_zero3_offload", "fsdp2_offload"),
]


def _peak_mib(start_kib: int) -> float:
    if torch.cuda.is_available() and runtime.backend() == "nccl":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kib) / 1024


def _build(kind: str, model: GPT):
    """-> (callable model, zero_grad, backward, step)."""
    if kind == "ours_ddp":
        ddp, opt = DDP(model), make_optimizer(model.parameters())
        return ddp, ddp.zero_grad, ddp.backward, opt.step
    if kind.startswith("ours_zero3"):
        z = ZeRO(model, 3, offload=kind.endswith("offload"))
        return z, z.zero_grad, z.backward, z.step
    if kind == "torch_ddp":
        dev = runtime.device()
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = make_optimizer(model.parameters())
        return ddp, lambda: opt.zero_grad(set_to_none=False), lambda l: l.backward(), opt.step
    mesh = init_device_mesh(runtime.device().type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=False) if kind.endswith("offload") else OffloadPolicy()
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    opt = make_optimizer(model.parameters())
    return model, opt.zero_grad, lambda l: l.backward(), opt.step


def _run(kind: str, cfg: GPTConfig, steps: int, warmup: int, batch: int):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = GPT(cfg, 0).to(runtime.device())
    fwd, zero_grad, backward, step = _build(kind, model)
    data, times = SyntheticData(cfg.vocab, cfg.seq, 0), []
    for s in range(warmup + steps):
        x, y = (t.to(runtime.device()) for t in local_batch(data, s, batch))
        comm.barrier()
        t0 = time.perf_counter()
        zero_grad()
        _, loss = fwd(x, y)
        backward(loss)
        step()
        if runtime.device().type == "cuda":
            torch.cuda.synchronize(runtime.device())
        times.append(time.perf_counter() - t0)
    return times[warmup:], _peak_mib(start), loss.item()


@exit_on_error
def main(argv=None):
    ap = ArgumentParser(
        prog="python -m minipar.bench.dp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--world", type=Int, default=2, help="ranks [2]")
    ap.add_argument("--steps", type=Int, default=15, help="timed steps [15]")
    ap.add_argument("--warmup", type=Int, default=3, help="untimed steps first [3]")
    ap.add_argument("--batch", type=Int, default=8, help="global batch, a multiple of --world [8]")
    a = ap.parse_args(argv)
    p = Problems(cli=True)
    ok = (
        p.integer("world", a.world, low=1)
        & p.integer("steps", a.steps, low=1)
        & p.integer("batch", a.batch, low=1)
    )
    p.integer("warmup", a.warmup, low=0)
    if ok:
        p.divides("world", a.world, "batch", a.batch, "every rank gets the same sequences")
    p.raise_if_any()
    psi = sum(p.numel() for p in GPT(CFG).parameters())
    print(
        f"model: {CFG.layers} layers, hidden {CFG.hidden}, Ψ = {psi:,}; world {a.world}; "
        f"batch {a.batch}; median of {a.steps} steps after {a.warmup} warm-up"
    )
    stats = {}
    for _, ours, theirs in PAIRS:
        for kind in (ours, theirs):
            per_rank = runtime.launch(_run, a.world, kind, CFG, a.steps, a.warmup, a.batch, timeout=300)
            slowest = [max(r[0][i] for r in per_rank) for i in range(a.steps)]
            stats[kind] = (statistics.median(slowest), max(r[1] for r in per_rank), per_rank[0][2])
    print(f"{'pair':<18}{'ours ms':>9}{'torch ms':>10}{'ratio':>8}{'ours MiB':>10}{'torch MiB':>11}")
    for name, ours, theirs in PAIRS:
        (t1, m1, l1), (t2, m2, l2) = stats[ours], stats[theirs]
        print(
            f"{name:<18}{t1 * 1e3:>9.1f}{t2 * 1e3:>10.1f}{t1 / t2:>8.2f}{m1:>10.1f}{m2:>11.1f}"
            f"   (last loss {l1:.4f} vs {l2:.4f})"
        )
    return stats


if __name__ == "__main__":
    rc = main()  # 2 for a refused command line; the results otherwise
    sys.exit(rc if isinstance(rc, int) else 0)
