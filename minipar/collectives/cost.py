"""The α-β cost of each collective algorithm, and the same two numbers measured from a trace.

Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in
MPICH" (IJHPCA 19(1)), price a collective as

    T = steps · α + bytes · β        (β = 1 / bandwidth)

where `steps` is the number of sequential message steps on the critical path (each pays the
latency α once) and `bytes` the bytes each rank sends along that path. `alpha_beta` gives the two
counts of the algorithms in this package, exactly as they run here (S = the tensor's bytes after
the padding each algorithm applies, see `padded_numel`; for all-gather S is the gathered output,
for reduce-scatter and all-to-all the input, as in `minipar.trace`):

    algorithm          op              steps                   bytes
    ring               all_reduce      2(N-1)                  2(N-1)/N · S
    ring               all_gather      N-1                     (N-1)/N · S
    ring               reduce_scatter  N-1                     (N-1)/N · S
    tree (binomial)    all_reduce      2·ceil(log2 N)          2·ceil(log2 N) · S
    halving_doubling   all_reduce      2·log2 N                2(N-1)/N · S          N a power of two
                                       2·floor(log2 N) + 2     2(P-1)/P · S + 2S     else, P = 2^floor(log2 N)
    pairwise           all_to_all      N-1                     (N-1)/N · S

`critical_path(events)` measures both counts from what ran: it rebuilds every step from the
traced sends and receives (`comm.batch_p2p` stamps the messages of one step with one `round`),
links each receive to its send, and runs the steps through `minipar.sim` twice, once with each
step costing 1 (the α count) and once costing its largest message (the β count).
"""

from __future__ import annotations

import math
from collections import defaultdict

from ..sim import Op, run
from ..validation import Problems

__all__ = [
    "ALGORITHMS",
    "OPS_OF",
    "alpha_beta",
    "hierarchical_alpha_beta",
    "padded_numel",
    "chunks",
    "collective_time",
    "critical_path",
    "traffic",
]

# which collectives each algorithm implements here
OPS_OF = {
    "ring": ("all_reduce", "all_gather", "reduce_scatter"),
    "tree": ("all_reduce",),
    "halving_doubling": ("all_reduce",),
    "pairwise": ("all_to_all",),
}
ALGORITHMS = tuple(OPS_OF)
_ALL_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _check(algorithm, op, n, nbytes) -> None:
    p = Problems()
    if (
        p.choice("algorithm", algorithm, ALGORITHMS)
        and p.choice("op", op, _ALL_OPS)
        and op not in OPS_OF[algorithm]
    ):
        p.add(
            f"there is no {algorithm} {op}: {algorithm} implements {', '.join(OPS_OF[algorithm])}; "
            f"{op} is implemented by {', '.join(a for a, ops in OPS_OF.items() if op in ops)}"
        )
    p.integer("n", n, low=1, why="the number of ranks in the group")
    p.number("nbytes", nbytes, low=0, why="the bytes of the tensor")
    p.raise_if_any("no α-β cost for this collective")


def alpha_beta(algorithm: str, op: str, n: int, nbytes: float) -> tuple[int, float]:
    """(steps, bytes): the α count (sequential message steps on the critical path) and the β count
    (bytes each rank sends along it) of `op` by `algorithm` over `n` ranks on a tensor of `nbytes`
    (Thakur, Rabenseifner & Gropp 2005; see the table above). Raises ConfigError for an algorithm
    or op that does not exist here, or bad n or nbytes. A group of one rank costs (0, 0.0)."""
    _check(algorithm, op, n, nbytes)
    S = float(nbytes)
    if n == 1:
        return 0, 0.0
    if algorithm == "ring":
        phases = 2 if op == "all_reduce" else 1  # all-reduce = reduce-scatter + all-gather
        return phases * (n - 1), phases * (n - 1) / n * S
    if algorithm == "tree":
        levels = math.ceil(math.log2(n))
        return 2 * levels, 2 * levels * S
    if algorithm == "halving_doubling":
        P = 1 << (n.bit_length() - 1)
        steps, sent = 2 * (P.bit_length() - 1), 2 * (P - 1) / P * S
        return (steps, sent) if P == n else (steps + 2, sent + 2 * S)  # fold and unfold: S each
    return n - 1, (n - 1) / n * S  # pairwise all-to-all


def hierarchical_alpha_beta(intra: int, inter: int, nbytes: float, inter_algorithm: str = "ring") -> dict:
    """{"intra": (steps, bytes), "inter": (steps, bytes)} of `hierarchical_all_reduce` with
    `intra` ranks per node and `inter` nodes: a ring reduce-scatter + all-gather on the node's
    links, and `inter_algorithm`'s all-reduce of one slice, S/intra, across nodes. Each pair is
    priced on its own link: T = Σ steps·α_link + bytes/bandwidth_link."""
    _check("ring", "all_reduce", intra, nbytes)
    _check(inter_algorithm, "all_reduce", inter, nbytes)
    return {
        "intra": alpha_beta("ring", "all_reduce", intra, nbytes),
        "inter": alpha_beta(inter_algorithm, "all_reduce", inter, nbytes / intra),
    }


def chunks(algorithm: str, n: int) -> int:
    """How many equal pieces `algorithm` cuts a tensor into over `n` ranks: ring and pairwise N,
    halving-doubling the largest power of two <= N, the tree 1 (it always sends the whole)."""
    if algorithm in ("ring", "pairwise"):
        return n
    if algorithm == "halving_doubling":
        return 1 << (n.bit_length() - 1)
    return 1


def padded_numel(algorithm: str, n: int, numel: int) -> int:
    """The element count `algorithm` really moves: `numel` rounded up to a multiple of its chunks."""
    c = chunks(algorithm, n)
    return -(-numel // c) * c


def collective_time(
    algorithm: str, op: str, n: int, nbytes: float, latency: float, bandwidth: float
) -> float:
    """Seconds by the α-β model on a link of `latency` (α) and `bandwidth` (bytes/s, 1/β)."""
    steps, sent = alpha_beta(algorithm, op, n, nbytes)
    return steps * latency + sent / bandwidth


# ----------------------------------------------------------------------------- measured from a trace
def _steps(events) -> dict:
    """{rank: [(round, [send events], [recv events])]} in the order each rank ran its steps."""
    rounds = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for i, e in enumerate(events):
        if e.cat == "comm" and e.name in ("send", "recv"):
            key = e.meta.get("round", ("alone", i))  # a lone isend/irecv is a step of its own
            rounds[e.rank][key][e.name == "recv"].append(e)
    return {
        r: sorted(((k, s, v) for k, (s, v) in by.items()), key=lambda t: min(e.start for e in t[1] + t[2]))
        for r, by in rounds.items()
    }


def critical_path(events) -> tuple[int, int]:
    """(steps, bytes) along the critical path of the sends and receives in `events` (the events
    of every rank taking part, e.g. `trace.gather()`), measured: a step of a rank starts when its
    previous step has ended and every sender it receives from has ended the step before its send."""
    steps = _steps(events)
    if not steps:
        return 0, 0
    sends = defaultdict(list)  # (src, dst) -> [index of the step], in order
    for r, seq in steps.items():
        for i, (_, ss, _) in enumerate(seq):
            for e in ss:
                sends[r, e.meta["peer"]].append(i)
    out = []
    for cost in (lambda ss, rr: 1, lambda ss, rr: max(e.bytes for e in ss + rr)):
        seen, lanes = defaultdict(int), {}
        for r, seq in steps.items():
            lanes[r] = []
            for i, (_, ss, rr) in enumerate(seq):
                deps = []
                for e in rr:  # the k-th receive from p is p's k-th send to me
                    src = e.meta["peer"]
                    j = sends[src, r][seen[src, r]]
                    seen[src, r] += 1
                    if j > 0:
                        deps.append(("step", src, j - 1))
                lanes[r].append(Op(("step", r, i), r, cost(ss, rr), tuple(deps)))
        done = run(lanes)
        out.append(max(op.end for op in done.values()))
    return int(out[0]), int(out[1])


def traffic(events) -> dict:
    """{rank: (steps it took part in, bytes it sent)}, measured from `events`."""
    return {r: (len(seq), sum(e.bytes for _, ss, _ in seq for e in ss)) for r, seq in _steps(events).items()}
