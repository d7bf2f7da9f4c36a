# %% [markdown]
# # 00 · Collectives: the five verbs of distributed training
#
# Every parallelism strategy in minipar is built from a handful of collective operations over a
# group of N ranks. This notebook runs each of them on **simulated ranks** (N local processes talking
# over gloo, exactly the code that runs under `torchrun` with NCCL on GPUs), then builds the most
# important one, **ring all-reduce**, from point-to-point messages and measures what it costs.
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
import json
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
    r, n = runtime.rank(), runtime.world_size()
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
# implementation (`minipar/collectives.py`):

# %%
from minipar.collectives import ring_all_reduce
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
# The measured bytes per rank for N = 2, 3, 4, against 2(N−1)/N · S.

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
from minipar.collectives import ring_neighbours
from minipar.exercises import check

# %% tags=["solution"]
def ring_all_gather(x, group=None):
    r, n, left, right = ring_neighbours(group)
    blocks = [None] * n
    blocks[r] = x
    for s in range(n - 1):
        buf = torch.empty_like(x)
        for h in comm.batch_p2p(sends=[(blocks[(r - s) % n], right)], recvs=[(buf, left)]):
            h.wait()
        blocks[(r - s - 1) % n] = buf
    return torch.cat(blocks)

# %%
verdict = check("ring_all_gather", ring_all_gather)
print(verdict)
assert verdict  # solution-only
