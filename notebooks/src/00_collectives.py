# %% [markdown]
# # 00 · Collectives: the five verbs of distributed training
#
# Every parallelism strategy in minipar is built from a handful of collective operations over a
# group of N ranks. This notebook runs each of them on **simulated ranks** (N local processes talking
# over gloo, exactly the code that runs under `torchrun` with NCCL on GPUs), then builds the most
# important one, **ring all-reduce**, from point-to-point messages and measures what it costs.
# Then the other algorithms NCCL and MPI choose from (tree, halving-doubling, hierarchical,
# pairwise all-to-all), and the α-β model that says which one wins for which message size.
#
# | collective | before (rank r holds) | after (rank r holds) | bytes each rank sends, ring algorithm |
# |---|---|---|---|
# | all-reduce | x_r | Σ x_j | 2(N−1)/N · S |
# | all-gather | x_r | [x_0, …, x_{N−1}] | (N−1)/N · S_out |
# | reduce-scatter | x_r (N blocks) | block r of Σ x_j | (N−1)/N · S_in |
# | all-to-all | N blocks, block j for rank j | block r of every rank | (N−1)/N · S (even splits) |
# | broadcast | x_src on src | x_src | S (from the source) |
#
# S is the size in bytes of the tensor the collective works on. The all-reduce cost is from
# Patarasuk & Yuan (2009), *Bandwidth optimal all-reduce algorithms*; minipar's trace records it
# for every call as `wire_bytes`, next to the logical payload `bytes`.

# %%
import inspect
import math
import os
import tempfile

import matplotlib.pyplot as plt
import torch

import minipar
from minipar import comm, runtime, trace
from minipar.mesh import Mesh, enumerate_groups
from minipar.timeline import COLORS, plot_timeline

N = 4

# %% [markdown]
# ## Starting ranks from a notebook cell
# `minipar.launch(fn, N)` forks N processes, initializes a gloo process group in each, runs `fn`,
# and returns every rank's result in rank order. It forks rather than spawns, so `fn` can be
# defined right here in the notebook.

# %%
def hello():
    return f"rank {runtime.rank()} of {runtime.world_size()} on {runtime.device()}"

minipar.launch(hello, N)

# %% [markdown]
# ## Each collective on 4 ranks
# Rank r starts with a small tensor of its own; we collect what each rank holds after each
# collective, then draw it. Every call goes through `minipar.comm`, which records it.

# %%
def every_collective():
    r = runtime.rank()
    x = torch.arange(4.0) + 10 * r                      # 4 values per rank
    out = {"input": x}
    out["all_reduce"] = comm.all_reduce(x.clone())
    out["all_gather"] = comm.all_gather(x[:1].clone())
    out["reduce_scatter"] = comm.reduce_scatter(x.clone())
    out["all_to_all"] = comm.all_to_all(x.clone())      # block j (1 value) goes to rank j
    out["broadcast"] = comm.broadcast(x.clone(), src=0)
    return {k: v.tolist() for k, v in out.items()}, trace.events()

results = minipar.launch(every_collective, N)
states = [r[0] for r in results]

fig, axes = plt.subplots(1, 6, figsize=(14, 2.6))
for ax, name in zip(axes, states[0]):
    rows = [states[r][name] for r in range(N)]
    width = max(len(v) for v in rows)
    grid = torch.full((N, width), float("nan"))
    for r, v in enumerate(rows):
        grid[r, :len(v)] = torch.tensor(v)
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=140)
    for r in range(N):
        for j, val in enumerate(rows[r]):
            ax.text(j, r, f"{val:g}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(name, fontsize=9)
    ax.set_yticks(range(N), [f"rank {r}" for r in range(N)] if name == "input" else [""] * N)
    ax.set_xticks([])
fig.suptitle("What each rank holds after each collective (rank r starts with 10r + [0, 1, 2, 3])", fontsize=10)
plt.tight_layout()

# %% [markdown]
# The recorded bytes match the table: for N = 4 and S = 16 bytes (four fp32 values) an all-reduce
# sends 2·3/4·16 = 24 bytes per rank. The summary is per rank, per op and per axis.

# %%
evs = results[0][1]
print(trace.format_summary(evs))
ar = next(e for e in evs if e.name == "all_reduce")
assert ar.bytes == 16 and ar.wire_bytes == 2 * (N - 1) / N * 16
assert states[2]["all_reduce"] == [60.0, 64.0, 68.0, 72.0]
assert states[1]["all_to_all"] == [1.0, 11.0, 21.0, 31.0]

# %% [markdown]
# ## Ring all-reduce from send and receive
# Cut the tensor into N chunks. In the **reduce-scatter phase** (N−1 steps) every rank passes one
# chunk to its right neighbour and adds the chunk arriving from the left; afterwards rank r owns the
# full sum of one chunk. In the **all-gather phase** (N−1 more steps) the finished chunks travel once
# around the ring. Each step moves S/N bytes per rank, so each rank sends
#
# $$2(N-1)\cdot\frac{S}{N} = \frac{2(N-1)}{N}S$$
#
# which approaches 2S however many ranks there are: that is why it scales. Here is minipar's
# implementation (`minipar/collectives/ring.py`): the all-reduce is a reduce-scatter followed by an
# all-gather, the first of which is

# %%
from minipar.collectives import ring_all_reduce, ring_reduce_scatter

print(inspect.getsource(ring_reduce_scatter))
print(inspect.getsource(ring_all_reduce))

# %%
NUMEL = 4096

def ring_vs_builtin(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(runtime.rank()))
    want = x.clone()
    torch.distributed.all_reduce(want)          # torch's own, untraced, as the referee
    trace.reset()
    got = ring_all_reduce(x.clone())
    sent = sum(e.wire_bytes for e in trace.events() if e.name == "send")
    return (got - want).abs().max().item(), sent, trace.gather()

ring = minipar.launch(ring_vs_builtin, N, NUMEL)
S = NUMEL * 4
for r, (err, sent, _) in enumerate(ring):
    print(f"rank {r}: max |ring - dist.all_reduce| = {err:.2e}, bytes sent = {sent:,.0f}, "
          f"formula 2(N-1)/N*S = {2 * (N - 1) / N * S:,.0f}")
    assert err < 1e-5 and sent == 2 * (N - 1) / N * S

# %% [markdown]
# ### Its timeline
# Every send and receive was traced. Each rank's row has a compute lane (top, empty here) and a
# communication lane (bottom). The 2(N−1) = 6 steps are visible as six exchanges per rank. These are
# wall-clock times from 4 processes sharing this machine's cores, so widths are noisy; later
# notebooks also show a *modeled* clock.

# %%
merged = ring[0][2]
ax = plot_timeline(merged, title=f"ring all-reduce of {S:,} bytes on {N} ranks (wall clock)")
plt.tight_layout()

# %% [markdown]
# The same events export to Chrome's trace format: open the file in https://ui.perfetto.dev or
# `chrome://tracing` to zoom in. One track per rank:

# %%
path = os.path.join(tempfile.mkdtemp(), "ring_allreduce.json")
doc = trace.to_chrome_trace(merged, path)
tracks = sorted({e["pid"] for e in doc["traceEvents"] if e["ph"] == "X"})
print(path, "tracks:", tracks)
assert tracks == list(range(N))

# %% [markdown]
# ### Bytes against N
# The measured bytes per rank for N = 2, 3, 4, against 2(N−1)/N · S. (1200 elements divide by
# 2, 3 and 4; otherwise the ring pads the tensor to a multiple of N, so that all chunks are equal.)

# %%
sizes = [2, 3, 4]
measured = [minipar.launch(ring_vs_builtin, n, 1200)[0][1] for n in sizes]
formula = [2 * (n - 1) / n * 1200 * 4 for n in sizes]
plt.figure(figsize=(4.5, 3))
plt.plot(sizes, formula, "k--", label="2(N−1)/N · S")
plt.plot(sizes, measured, "o", color=COLORS["all_reduce"], label="measured (trace)")
plt.axhline(2 * 1200 * 4, color=COLORS["recv"], lw=0.8, label="2S (limit)")
plt.xlabel("ranks N"); plt.ylabel("bytes sent per rank (B)"); plt.legend(fontsize=8)
plt.title("ring all-reduce of S = 4.8 kB: bytes per rank"); plt.tight_layout()
assert measured == formula

# %% [markdown]
# ## Other algorithms, and the α-β model
# The ring sends the fewest bytes, but it takes 2(N−1) steps, and every step pays a latency α
# (software, PCIe, the NIC, the switch: microseconds) before its bytes flow at the link's bandwidth.
# Hockney's α-β model prices a collective as **steps · α + bytes / bandwidth**; Thakur, Rabenseifner &
# Gropp (2005) count both for every algorithm MPICH uses. The ones in `minipar.collectives`:
#
# | algorithm | all-reduce steps | bytes sent per rank on the critical path |
# |---|---|---|
# | ring | 2(N−1) | 2(N−1)/N · S |
# | tree (binomial: reduce up, broadcast down) | 2⌈log₂N⌉ | 2⌈log₂N⌉ · S |
# | halving-doubling (Rabenseifner), N = 2ᴸ | 2 log₂N | 2(N−1)/N · S |
# | halving-doubling, other N (fold the extra ranks in, and back out) | 2⌊log₂N⌋ + 2 | 2(P−1)/P · S + 2S |
#
# The tree pays few steps and many bytes: it wins for small messages, the ring for large ones. NCCL
# makes the same choice (its tree is a pipelined *double* binary tree, which brings the bytes back
# near the ring's at large sizes). Here is the tree:

# %%
from minipar.collectives import (
    alpha_beta,
    critical_path,
    halving_doubling_all_reduce,
    hierarchical_all_reduce,
    hierarchical_alpha_beta,
    pairwise_all_to_all,
    traffic,
    tree_all_reduce,
)

print(inspect.getsource(tree_all_reduce))

# %% [markdown]
# Each algorithm on 8 ranks and on the first 6 (a group: not a power of two), against torch's
# `dist.all_reduce` on the same group. The values are whole numbers in float64, so every summation
# order gives the same bits and we can ask for equality. The trace holds every message, and
# `critical_path` rebuilds the steps from it: each step of a rank starts when its previous step and
# the step of every sender it receives from have ended. It measures the steps and the bytes along
# that path, which `alpha_beta` must match exactly.

# %%
ALGOS = {"ring": ring_all_reduce, "tree": tree_all_reduce, "halving_doubling": halving_doubling_all_reduce}
NUMEL = 1680                                           # divides by 8, 6 and 4: no padding


def every_algorithm():
    me, out = runtime.rank(), {}
    six = torch.distributed.new_group(list(range(6)))
    for n, group in ((8, None), (6, six)):
        if me >= n:
            continue
        x = torch.randint(-100, 100, (NUMEL,), generator=torch.Generator().manual_seed(me), dtype=torch.float64)
        want = x.clone()
        torch.distributed.all_reduce(want, group=group)
        for name, fn in ALGOS.items():
            trace.reset()
            got = fn(x, group)
            evs = trace.gather(group)
            out[n, name] = (torch.equal(got, want), critical_path(evs), traffic(evs))
    return out


measured = minipar.launch(every_algorithm, 8)[0]
S = NUMEL * 8
print(f"all-reduce of S = {S:,} bytes        measured (steps, bytes)    alpha_beta          bytes sent per rank")
for (n, name), (equal, path, per_rank) in measured.items():
    model = alpha_beta(name, "all_reduce", n, S)
    print(f"N={n} {name:<17} equal to torch: {equal}   {str(path):<22} {str((model[0], int(model[1]))):<20}"
          f"{sorted({b for _, b in per_rank.values()})}")
    assert equal and path == model
    if name == "ring":
        assert all(v == path for v in per_rank.values())   # the ring is symmetric: every rank is on the path

# %% [markdown]
# The last column shows what the critical path hides: in the tree, rank 0 receives at every level
# and sends at every level of the broadcast, while a leaf sends S once; with N = 6 the two folded-in
# ranks of halving-doubling send S once and wait.
#
# ### Which algorithm wins where
# With the measured counts, each algorithm's time is a line in S: steps · α + bytes(S) / bandwidth.
# On NVLink 4 (`minipar.plan.hardware`: α = 3 µs per message, 450 GB/s per direction):

# %%
from minipar.plan.hardware import get_link

link = get_link("nvlink4")
sizes = torch.logspace(2, 9, 300, dtype=torch.float64)          # 100 B .. 1 GB
STYLE = {"ring": ("-", COLORS["all_reduce"]), "tree": ("--", COLORS["all_gather"]),
         "halving_doubling": (":", COLORS["reduce_scatter"])}


def modeled(n, name, s):
    """steps·α + bytes/bandwidth, with the steps and the bytes per byte of S measured above."""
    steps, sent = measured[n, name][1]
    return steps * link.latency + sent / S * s / link.bandwidth


fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
crossover = {}
for ax, n in zip(axes, (8, 6)):
    for name in ALGOS:
        ls, c = STYLE[name]
        ax.loglog(sizes, [modeled(n, name, s) * 1e6 for s in sizes], ls, color=c, label=name)
    # ring = tree where the ring's extra steps cost what the tree's extra bytes do
    (rs, rb), (ts, tb) = measured[n, "ring"][1], measured[n, "tree"][1]
    crossover[n] = link.latency * (rs - ts) / ((tb - rb) / S / link.bandwidth)
    ax.axvline(crossover[n], color="gray", lw=0.8)
    ax.text(crossover[n] * 1.2, ax.get_ylim()[0] * 2, f"ring = tree\nat {crossover[n] / 1e6:.1f} MB", fontsize=8)
    ax.set_title(f"all-reduce on N = {n}, {link.name} (α-β model, measured counts)", fontsize=9)
    ax.set_xlabel("message size S (bytes)"); ax.set_ylabel("time (µs)"); ax.legend(fontsize=8)
plt.tight_layout()
for n, s_star in crossover.items():
    L = math.ceil(math.log2(n))
    formula = link.latency * (2 * (n - 1) - 2 * L) / ((2 * L - 2 * (n - 1) / n) / link.bandwidth)
    below, above = s_star * 0.98, s_star * 1.02
    print(f"N = {n}: the tree wins below {s_star:,.0f} B, the ring above (formula: {formula:,.0f} B)")
    assert abs(s_star - formula) < 1e-6 * formula
    assert modeled(n, "tree", below) < modeled(n, "ring", below) and modeled(n, "ring", above) < modeled(n, "tree", above)
winner = {n: [min(ALGOS, key=lambda a: modeled(n, a, s)) for s in (1e3, 1e8)] for n in (8, 6)}
print("fastest at 1 kB and at 100 MB:", winner)
assert winner[8] == ["halving_doubling", "halving_doubling"] and winner[6] == ["halving_doubling", "ring"]

# %% [markdown]
# With N = 8, a power of two, halving-doubling has the tree's steps *and* the ring's bytes, so the
# model says it always wins (on real hardware its distant partners contend for the links of a ring or
# a torus, which the model leaves out). With N = 6 its fold costs 2S more bytes: it wins for small
# messages, the ring for large ones. Either way the lesson is the crossover S*, where the ring's
# extra steps cost what the tree's extra bytes do:
#
# $$S^* = \frac{\alpha\,(2(N-1) - 2\lceil\log_2 N\rceil)}{\beta\,(2\lceil\log_2 N\rceil - 2(N-1)/N)}$$
#
# Below it the latency decides (flat lines), above it the bandwidth. S* grows with α × bandwidth:
# on NVLink, microseconds times hundreds of GB/s, it is megabytes.
#
# ### Hierarchical all-reduce: fast links inside a node, slow ones across
# A node has A GPUs on NVLink; nodes talk over one NIC per GPU, an order of magnitude slower. The
# hierarchical algorithm (Horovod's, and the shape of NCCL's inter-node algorithms) reduce-scatters
# inside the node, all-reduces each 1/A slice across nodes, then all-gathers inside the node: only
# S/A bytes per GPU cross the NIC. Here on 2 "nodes" of 4 ranks, the groups made by a `Mesh`:

# %%
print(inspect.getsource(hierarchical_all_reduce))


def two_nodes():
    Mesh(node=2, gpu=4)                                 # the last axis is consecutive ranks: the node
    x = torch.randint(-100, 100, (NUMEL,), generator=torch.Generator().manual_seed(runtime.rank()), dtype=torch.float64)
    want = x.clone()
    torch.distributed.all_reduce(want)
    trace.reset()
    got = hierarchical_all_reduce(x, intra="gpu", inter="node")
    evs = trace.gather()
    by_axis = {a: critical_path([e for e in evs if e.axis == a]) for a in ("gpu", "node")}
    return torch.equal(got, want), by_axis


equal, by_axis = minipar.launch(two_nodes, 8)[0]
model = hierarchical_alpha_beta(4, 2, S)
print(f"equal to torch: {equal}; measured in the node {by_axis['gpu']}, across {by_axis['node']}; model {model}")
assert equal and by_axis["gpu"] == model["intra"] and by_axis["node"] == model["inter"]
nic = get_link("ib-ndr")
for s in (1e4, 1e8):
    hier = sum(st * l.latency + b / S * s / l.bandwidth
               for (st, b), l in ((by_axis["gpu"], link), (by_axis["node"], nic)))
    flat = alpha_beta("ring", "all_reduce", 8, s)
    flat = flat[0] * nic.latency + flat[1] / nic.bandwidth   # a flat ring runs at its slowest link's speed
    print(f"S = {s:,.0f} B: hierarchical {hier * 1e6:8.1f} µs, flat ring over {nic.name} {flat * 1e6:8.1f} µs")
    assert hier < flat

# %% [markdown]
# ### All-to-all by pairwise exchange
# Expert and Ulysses parallelism move tokens with all-to-all: rank r sends block j to rank j. In step
# k = 1..N−1, rank r sends block r+k to rank r+k and receives from r−k: N−1 steps of S/N bytes.
# The same launch machinery checks it against `dist.all_to_all_single`:

# %%
def all_to_all_pairwise():
    x = torch.arange(16.0) + 100 * runtime.rank()
    want = torch.empty_like(x)
    torch.distributed.all_to_all_single(want, x)
    trace.reset()
    got = pairwise_all_to_all(x)
    return torch.equal(got, want), critical_path(trace.gather())


eq, path = minipar.launch(all_to_all_pairwise, 4)[0]
print(f"pairwise all-to-all on 4 ranks: equal to torch {eq}; measured {path}, alpha_beta "
      f"{alpha_beta('pairwise', 'all_to_all', 4, 64)}")
assert eq and path == alpha_beta("pairwise", "all_to_all", 4, 64)

# %% [markdown]
# ## Groups: collectives over part of the world
# Parallel training runs collectives inside *groups*: the tensor-parallel ranks of one layer, the
# data-parallel replicas of one shard. A `Mesh` lays ranks out on named axes (last axis = consecutive
# ranks) and builds one group per axis with `new_group`. Here are the groups of an 8-rank
# pp=2 × dp=2 × tp=2 mesh, enumerated without starting anything:

# %%
axes = dict(pp=2, dp=2, tp=2)
for a in axes:
    print(f"{a} groups: {enumerate_groups(axes, a)}")
print(Mesh(8, **axes).describe())

# %%
def sums_per_axis():
    Mesh(dp=2, tp=2)
    x = torch.tensor([float(runtime.rank())])
    return comm.all_reduce(x.clone(), group="tp").item(), comm.all_reduce(x.clone(), group="dp").item()

out = minipar.launch(sums_per_axis, 4)
print("(sum over tp group, sum over dp group) per rank:", out)
assert out == [(1.0, 2.0), (1.0, 4.0), (5.0, 2.0), (5.0, 4.0)]

# %% [markdown]
# ## When a rank fails
# A rank that raises ends the whole launch within seconds: the others are killed and its traceback
# comes back as a `RankError`. The next launch works as usual.

# %%
def fails_on_rank_2():
    if runtime.rank() == 2:
        raise ValueError("rank 2 ran out of patience")
    comm.all_reduce(torch.ones(1))   # the others would wait here forever

try:
    minipar.launch(fails_on_rank_2, N)
except minipar.RankError as e:
    print(f"caught: rank {e.rank}:", e.remote_traceback.strip().splitlines()[-1])
print(minipar.launch(hello, 2))

# %% [markdown]
# ## Exercise: ring all-gather
# Write `ring_all_gather(x, group=None)` that returns every rank's `x` concatenated along dim 0,
# using only `comm.batch_p2p` (send/receive) with your ring neighbours. It takes N−1 steps; at each
# step a rank forwards the block it received in the previous step. It must send exactly
# (N−1)/N of the output's bytes per rank.
#
# `minipar.collectives.ring_neighbours(group)` gives `(my index, N, left, right)`.
# The checker runs your function on 4 ranks against `comm.all_gather` and counts the bytes.

# %%
from minipar.exercises import NotYet, check


# %% tags=["exercise"]
def ring_all_gather(x, group=None):
    """Every rank's x, concatenated along dim 0, in N-1 ring steps."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("ring_all_gather", ring_all_gather)
print(verdict)
assert verdict  # solution-only
