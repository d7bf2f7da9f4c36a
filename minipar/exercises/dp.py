"""Checkers for the data-parallel notebooks (01_data_parallel, 02_zero_fsdp)."""
from __future__ import annotations

import torch

from . import Verdict, checker, compare

__all__ = ["check_dp_allreduce", "check_zero_shard"]

_CFG = dict(vocab=32, seq=8, layers=1, heads=2, hidden=16)


class _Raised(Exception):
    pass


def _launch(fn, n, *args):
    """launch, turning a rank's failure into its last traceback line (what the student needs)."""
    from ..runtime import RankError, launch
    try:
        return launch(fn, n, *args)
    except RankError as e:
        if "NotYet" in e.remote_traceback:
            raise  # an unfinished solution: `checker` turns it into a "not yet" verdict
        raise _Raised(f"your code raised on rank {e.rank} of {n}: {e.remote_traceback.strip().splitlines()[-1]}")


def _verdict_on_raise(fn):
    import functools

    @functools.wraps(fn)
    def run(solution):
        try:
            return fn(solution)
        except _Raised as e:
            return Verdict(False, str(e), "read the error: it names the first thing that went wrong")
    return run


def _dp_allreduce_rank(solution, batch):
    from .. import runtime
    from ..dp import local_batch
    from ..model import GPT, GPTConfig, SyntheticData
    cfg = GPTConfig(**_CFG)
    model = GPT(cfg, seed=1)
    x, y = local_batch(SyntheticData(cfg.vocab, cfg.seq, 1), 0, batch)
    model(x, y)[1].backward()
    solution(model)
    return runtime.rank(), {n: p.grad.clone() for n, p in model.named_parameters()}


@checker("dp_allreduce")
@_verdict_on_raise
def check_dp_allreduce(solution) -> Verdict:
    """`solution(model)` must turn each rank's local gradients into the average over all
    ranks, in place, with `minipar.comm`. Checked on 2 and 4 ranks against one device
    that sees the whole batch."""
    from ..model import GPT, GPTConfig, SyntheticData
    cfg = GPTConfig(**_CFG)
    for n in (2, 4):
        ref = GPT(cfg, seed=1)
        x, y = SyntheticData(cfg.vocab, cfg.seq, 1).batch(0, 8)
        ref(x, y)[1].backward()
        want = {k: p.grad for k, p in ref.named_parameters()}
        for r, got in _launch(_dp_allreduce_rank, n, solution, 8):
            for k, g in got.items():
                err = compare(g, want[k], f"gradient of {k} with {n} ranks", atol=1e-6, rank=r)
                if err:
                    hint = ("each rank's gradient is the mean over its own rows; the global mean is the "
                            "average of those means: all_reduce the sum, then divide by the world size")
                    return Verdict(False, err, hint)
    return Verdict(True, "every rank holds the full-batch gradient, on 2 and 4 ranks")


def _zero_shard_rank(solution, numel):
    from .. import runtime
    r = runtime.rank()
    flat = torch.arange(numel, dtype=torch.float32) * (r + 1)
    return r, solution(flat)


@checker("zero_shard")
@_verdict_on_raise
def check_zero_shard(solution) -> Verdict:
    """`solution(flat_grad)` gets this rank's full flat gradient (numel not necessarily a
    multiple of the world size N) and must return this rank's shard of the average over
    ranks: pad with zeros to a multiple of N, reduce-scatter, keep rank r's ceil(numel/N)
    elements. Checked with 10 elements on 2, 3 and 4 ranks."""
    numel = 10
    for n in (2, 3, 4):
        shard = -(-numel // n)
        mean = torch.arange(numel, dtype=torch.float32) * sum(r + 1 for r in range(n)) / n
        padded = torch.cat([mean, torch.zeros(shard * n - numel)])
        for r, got in _launch(_zero_shard_rank, n, solution, numel):
            err = compare(got, padded[r * shard:(r + 1) * shard], f"shard with {n} ranks", atol=1e-5, rank=r)
            if err:
                return Verdict(False, err, "pad to ceil(numel / N) * N, then comm.reduce_scatter(..., op='avg'): "
                               "every rank gets the average, and only its own slice")
    return Verdict(True, "padded, reduce-scattered and averaged correctly on 2, 3 and 4 ranks")
