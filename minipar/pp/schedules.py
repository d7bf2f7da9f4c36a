"""Pipeline schedules as data: per-rank ordered lists of actions like `0F1`.

An action is (stage, kind, microbatch). Kinds: F (forward), B (full backward),
I (input-gradient half of B), W (weight-gradient half of B), and after lowering
(`lower.py`) SEND_F/RECV_F/SEND_B/RECV_B. Every generator below returns a
`Schedule`; the validator, the simulator, the executor and the timeline all read
the same object.

Notation (the papers'): p ranks, m micro-batches, v chunks (stages) per rank,
t_f / t_b the forward / backward time of one micro-batch on one rank.

| name | source | stages | bubble (idle per rank) | peak activations (rank 0) |
|---|---|---|---|---|
| naive | no micro-batching | p | (p-1)/p of the step | 1 |
| gpipe | Huang et al. 2019 | p | (p-1)(t_f+t_b) | m |
| 1f1b | PipeDream-Flush, Narayanan et al. 2021 | p | (p-1)(t_f+t_b) | p |
| interleaved_1f1b | Narayanan et al. 2021, Sec. 2.2 | vp, looped | (p-1)(t_f+t_b)/v | more than p |
| zb_h1 / zb_h2 / zbv | Qi et al. 2024 (`zerobubble.py`) | p / p / 2p in a V | see there | p / 2p-1 / 2p |
| dualpipe / dualpipev | DeepSeek-V3 (`dualpipe.py`) | 2p mirrored / 2p in a V | (PP/2-1)(F&B+B-3W) | p+1 / 2p+1 |
| pipedream(_2bw) | Narayanan et al. 2019 / 2021 (`pipedream.py`) | p | 1F1B order, no flush | p |

Each generator is `fn(p, m, v) -> {rank: [Action]}` (DualPipe's also returns its overlapped
F&B pairs); `build_schedule` checks the configuration first and wraps the lists with their
placement in a `Schedule`.
"""

from __future__ import annotations

from .actions import COMM, COMPUTE, Action, Schedule, parse_action
from .dualpipe import _dualpipe, _dualpipev
from .zerobubble import _zb_h1, _zb_h2, _zbv

__all__ = ["Action", "Schedule", "build_schedule", "SCHEDULES", "parse_action", "COMPUTE", "COMM"]


# ----------------------------------------------------------------------------- generators
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _naive(p, m, v):
    # One micro-batch at a time through the whole pipeline: model parallelism, no pipelining.
    return {r: [a for i in range(m) for a in (Action(r, "F", i), Action(r, "B", i))] for r in range(p)}


def _gpipe(p, m, v):
    return {
        r: [Action(r, "F", i) for i in range(m)] + [Action(r, "B", i) for i in range(m)] for r in range(p)
    }


def _one_f_one_b(p, m, v):
    """Warm up with p-1-r forwards, then alternate F and B, then drain: at most p-r in flight."""
    out = {}
    for r in range(p):
        w = min(p - 1 - r, m)
        acts = [Action(r, "F", i) for i in range(w)]
        for i in range(m - w):
            acts += [Action(r, "F", w + i), Action(r, "B", i)]
        acts += [Action(r, "B", i) for i in range(m - w, m)]
        out[r] = acts
    return out


def _interleaved(p, m, v):
    """Megatron-LM's interleaved 1F1B: rank r holds stages r, r+p, ..., r+(v-1)p and walks
    micro-batches in groups of p, depth first. Warm-up (v-1)p + 2(p-1-r) forwards."""
    out = {}
    total = m * v

    def fwd(k):  # the k-th forward on this rank: (chunk, micro-batch)
        return (k // p) % v, (k // (p * v)) * p + k % p

    def bwd(k):
        return v - 1 - (k // p) % v, (k // (p * v)) * p + k % p

    for r in range(p):
        w = min((v - 1) * p + 2 * (p - 1 - r), total)
        acts = []
        for k in range(w):
            c, i = fwd(k)
            acts.append(Action(c * p + r, "F", i))
        for k in range(total - w):
            c, i = fwd(w + k)
            acts.append(Action(c * p + r, "F", i))
            c, i = bwd(k)
            acts.append(Action(c * p + r, "B", i))
        for k in range(total - w, total):
            c, i = bwd(k)
            acts.append(Action(c * p + r, "B", i))
        out[r] = acts
    return out


def _pipedream(p, m, v):
    """Asynchronous PipeDream (Narayanan et al. 2019): 1F1B's order, no flush; the executor
    updates a stage's weights after every backward and stashes the version each F used."""
    return _one_f_one_b(p, m, v)


# ----------------------------------------------------------------------------- the registry
def _check(name, p, m, v, update_every):
    _need(isinstance(p, int) and p >= 1, f"num_ranks must be an int >= 1, got {p!r}")
    _need(isinstance(m, int) and m >= 1, f"num_microbatches must be an int >= 1, got {m!r}")
    _need(isinstance(v, int) and v >= 1, f"num_chunks must be an int >= 1, got {v!r}")
    if name == "interleaved_1f1b":
        _need(
            m % p == 0,
            f"interleaved_1f1b needs num_microbatches divisible by num_ranks "
            f"(Megatron-LM walks micro-batches in groups of p): m={m}, p={p}; try m={max(p, m // p * p)}",
        )
    elif name in ("zbv", "dualpipev", "dualpipe"):
        _need(v in (1, 2), f"{name} always places 2 chunks per rank; pass num_chunks=2 (or leave it at 1)")
    else:
        _need(v == 1, f"{name} has one stage per rank; num_chunks={v} only applies to interleaved_1f1b")
    if name == "dualpipe":
        _need(p % 2 == 0, f"dualpipe needs an even number of ranks (two mirrored halves), got num_ranks={p}")
        _need(
            m % 2 == 0 and m >= 2 * p,
            f"dualpipe needs an even num_microbatches >= 2 * num_ranks = {2 * p} "
            f"(each direction must fill its pipeline), got {m}",
        )
    if name == "dualpipev":
        _need(m >= 2 * p, f"dualpipev needs num_microbatches >= 2 * num_ranks = {2 * p}, got {m}")
    if name == "pipedream_2bw":
        _need(
            update_every >= p and m % update_every == 0,
            f"pipedream_2bw accumulates update_every={update_every} micro-batches per update; it must be "
            f">= num_ranks={p} (so two weight versions suffice, Narayanan et al. 2021 Sec. 3.1) and divide "
            f"num_microbatches={m}",
        )


_GEN = {
    "naive": _naive,
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": _interleaved,
    "zb_h1": _zb_h1,
    "zb_h2": _zb_h2,
    "zbv": _zbv,
    "dualpipe": _dualpipe,
    "dualpipev": _dualpipev,
    "pipedream": _pipedream,
    "pipedream_2bw": _pipedream,
}
SCHEDULES = tuple(_GEN)


def build_schedule(
    name: str, num_ranks: int, num_microbatches: int, num_chunks: int = 1, *, update_every: int | None = None
) -> Schedule:
    """Generate schedule `name` (one of SCHEDULES) for p ranks, m micro-batches, v chunks per rank.

    `update_every` only applies to pipedream_2bw: micro-batches per weight update (default p)."""
    if name not in _GEN:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    p, m, v = num_ranks, num_microbatches, num_chunks
    update_every = (p if update_every is None else update_every) if name == "pipedream_2bw" else update_every
    _check(name, p, m, v, update_every)
    if name in ("zbv", "dualpipev"):
        v, placement = 2, tuple(range(p)) + tuple(reversed(range(p)))  # V: 0..p-1, then back up
    elif name == "dualpipe":
        v, placement = 2, tuple(range(p)) + tuple(reversed(range(p)))  # the mirrored pipeline
    else:
        placement = tuple(s % p for s in range(p * v))  # looped
    S = len(placement)
    if name == "dualpipe":
        paths = tuple(tuple(range(p)) if i < m // 2 else tuple(range(p, 2 * p)) for i in range(m))
        part, chunk_cost = tuple(s % p for s in range(S)), 1.0
    else:
        paths, part, chunk_cost = (tuple(range(S)),) * m, tuple(range(S)), 1.0 / v
    if name == "pipedream":
        update_every = 1
    acts = _GEN[name](p, m, v)
    acts, overlapped = acts if isinstance(acts, tuple) else (acts, {})  # DualPipe's F&B pairs
    return Schedule(name, p, m, v, placement, acts, paths, part, chunk_cost, update_every, overlapped)
