# %% [markdown]
# # 06 · Context parallelism: ring attention, zigzag balancing, and Ulysses
#
# Long sequences run out of memory in the activations, and those grow with the number of tokens N.
# **Context parallelism (CP)** cuts the *sequence* across cp ranks. Everything in a transformer but
# attention works token by token, so each rank simply runs it on its N/cp tokens. Attention is the
# exception: every query needs every earlier key. There are two ways to provide them.
#
# | method | what moves | per rank, per layer (forward) | constraint |
# |---|---|---|---|
# | **Ring attention** (Liu et al. 2023, *Ring Attention with Blockwise Transformers*) | K/V blocks hop around a ring of ranks, cp−1 hops | (cp−1) · 2·b·h_kv·(N/cp)·d elements sent | none; overlaps with compute |
# | **DeepSpeed-Ulysses** (Jacobs et al. 2023) | all-to-all: sequence-sharded → head-sharded and back | 4 all-to-alls of b·(N/cp)·h·d elements | h % cp = 0 |
#
# The ring's backward sends the K/V blocks again (cp−1 hops) and their gradients dK/dV around a full circle
# (cp hops): (2cp−1) blocks. Ulysses' backward is 4 more all-to-alls.
#
# Ring attention rests on one identity. Softmax attention over a set of keys can be computed block by block:
# each block gives a partial output O_t and its log-sum-exp lse_t = log Σ_j exp(S_ij), and two partial results
# merge *exactly* (Milakov & Gimelshein 2018, *Online normalizer calculation for softmax*; used in FlashAttention):
#
# $$\text{lse} = \log\left(e^{\text{lse}_a} + e^{\text{lse}_b}\right), \qquad
#   O = e^{\text{lse}_a - \text{lse}}\,O_a + e^{\text{lse}_b - \text{lse}}\,O_b$$
#
# Each weight is the fraction of the total softmax mass that block holds. Merges are done in fp32.
#
# Tensors are laid out `[batch b, heads h, seq s, head_dim d]`. The code is in `minipar/cp.py`.
# Torch has its own `torch.distributed.tensor.experimental.context_parallel`, but it only runs on CUDA
# (SDPA flash/efficient kernels with NCCL), so this CPU notebook compares against full-sequence
# `F.scaled_dot_product_attention` instead.

# %%
import inspect
import os
import textwrap

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Polygon, Rectangle

import minipar
from minipar import cp, runtime, sim, trace
from minipar.activations import SavedActivations
from minipar.exercises import NotYet, check
from minipar.model import GPT, GPTConfig, SyntheticData, train_reference
from minipar.timeline import COLORS, plot_timeline

CP = 4
RANK_COLORS = [COLORS["F"], COLORS["B"], COLORS["W"], COLORS["all_gather"]]

# %% [markdown]
# ## The log-sum-exp merge, on one device
# Split the keys into two blocks, attend to each one separately, and merge. `cp.attend` returns
# `(O, lse)` for one block, using plain matmuls, because SDPA does not return the lse.

# %%
print(inspect.getsource(cp.attend))

# %% [markdown]
# The merge itself is this notebook's exercise; the next cell shows the package's version and checks
# it against SDPA over all keys (the student copy leaves it out).

# %% tags=["reveals"]
print(inspect.getsource(cp.merge_attention))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
o_a, lse_a = cp.attend(q, k[:, :, :2], v[:, :, :2])
o_b, lse_b = cp.attend(q, k[:, :, 2:], v[:, :, 2:])
merged, _ = cp.merge_attention(o_a, lse_a, o_b, lse_b)
full = F.scaled_dot_product_attention(q, k, v)
print(f"max |merge(block a, block b) - SDPA over all keys| = {(merged - full).abs().max():.2e}")
assert torch.allclose(merged, full, atol=1e-6)

# %% [markdown]
# ## The ring, step by step, and why zigzag
# Rank r keeps its queries. At step t it holds the K/V block of rank (r − t) mod cp, computes that
# block's partial attention, and merges it in. Meanwhile it has already posted the send of that block to
# rank r+1 and the receive of the next block from rank r−1. The figure shows the causal attention matrix
# (query position down, key position across) and colours each piece by the rank that computes it at each step.
# Triangles are diagonal blocks, where the causal mask applies.
#
# * **Contiguous** split: rank r holds tokens [rN/cp, (r+1)N/cp). Rank 0's queries only see their own block,
#   and the last rank's queries see every block. From step 1 on, rank r has work only when the block comes from
#   an earlier rank, so the ranks idle in turn. The last rank does cp times the work of rank 0.
# * **Zigzag** split (the layout of Megatron-LM's context parallelism and of ring-flash-attention; Brandon et al.
#   2023, *Striped Attention*, balance the same work with a round-robin split): cut the sequence into 2·cp
#   chunks and give rank r chunks r and 2cp−1−r, one early and one late. At every step after the first, each rank computes exactly half a block. Either its late chunk
#   sees both incoming chunks, or both its chunks see the incoming early chunk. The work is balanced.

# %%
def draw_step(ax, n, layout, step):
    m = len(cp.chunk_ids(0, n, layout))
    size = 1 / (m * n)                                   # one chunk, as a fraction of the sequence
    for me in range(n):
        src = (me - step) % n
        q_ids, k_ids = cp.chunk_ids(me, n, layout), cp.chunk_ids(src, n, layout)
        for i, j, mask in cp.visible_pairs(q_ids, k_ids, True, 1, "cpu"):
            x, y = k_ids[j] * size, q_ids[i] * size
            shape = (Polygon([(x, y), (x, y + size), (x + size, y + size)]) if mask is not None
                     else Rectangle((x, y), size, size))
            shape.set(facecolor=RANK_COLORS[me], edgecolor="white")
            ax.add_patch(shape)
    ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    ax.plot([0, 1], [0, 1], color="#999", lw=0.5)

fig, axes = plt.subplots(2, CP, figsize=(10, 5.4))
for row, layout in enumerate(("contiguous", "zigzag")):
    for step in range(CP):
        draw_step(axes[row, step], CP, layout, step)
        axes[row, step].set_title(f"{layout}, step {step}", fontsize=9)
axes[0, 0].set_ylabel("query position ↓"), axes[1, 0].set_ylabel("query position ↓")
fig.legend(handles=[Rectangle((0, 0), 1, 1, color=RANK_COLORS[r], label=f"rank {r}") for r in range(CP)],
           loc="center right", fontsize=8, frameon=False)
fig.suptitle("Who computes which block of the causal attention matrix at each ring step (cp = 4)", fontsize=10)
plt.tight_layout(rect=(0, 0, 0.9, 1))

# %% [markdown]
# ## The code
# `ring_attention` is a custom `autograd.Function`. Below is its forward pass. `_pass` posts the
# send/receive pair through `minipar.comm.batch_p2p`, so every byte is traced. The `F{step}` span is the
# compute of one ring step, and it records its FLOPs. The backward pass (`_RingAttention.backward` in
# `minipar/cp.py`) runs the same ring. It recomputes each block's probabilities from the saved final lse
# (FlashAttention-2, Alg. 2) and sends each block's dK/dV along with the block. After cp hops the
# gradient comes back to the rank that owns the block. Nothing ever gathers the full sequence.

# %%
print(textwrap.dedent(inspect.getsource(cp._RingAttention.forward)))

# %% [markdown]
# ## Parity on 4 simulated ranks
# Each rank takes its shard of the same random Q, K and V, and runs ring attention (both layouts) and Ulysses,
# causal and non-causal. The output and dQ, dK, dV must match full-sequence SDPA on that rank's slice.
# Ring attention sums in a different order (block by block), so it agrees to about 1e-6. Ulysses runs the
# same SDPA on the same numbers, one head group per rank, so it agrees bit for bit.

# %%
def parity():
    r, n = runtime.rank(), runtime.world_size()
    q, k, v, dout = (torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4))
    errs = {}
    for method, layout in (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "contiguous")):
        for causal in (True, False):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*full, is_causal=causal)
            want.backward(dout)
            mine = [cp.shard_sequence(t, r, n, layout).requires_grad_() for t in (q, k, v)]
            out = (cp.ring_attention(*mine, causal=causal, layout=layout) if method == "ring"
                   else cp.ulysses_attention(*mine, causal=causal))
            out.backward(cp.shard_sequence(dout, r, n, layout))
            pairs = [(out, want)] + [(a.grad, b.grad) for a, b in zip(mine, full)]
            errs[f"{method:7s} {layout:10s} causal={causal!s:5s}"] = max(
                (x - cp.shard_sequence(y, r, n, layout)).abs().max().item() for x, y in pairs)
    return errs

per_rank = minipar.launch(parity, CP)
for case in per_rank[0]:
    worst = max(e[case] for e in per_rank)
    print(f"{case}  max error over output, dQ, dK, dV, ranks: {worst:.1e}")
    assert worst < 1e-5

# %% [markdown]
# ## Overlap, and the work of each rank
# A bigger run (N = 2048, d = 64, forward and backward) shows the ring on a timeline. Each rank's compute
# lane holds one `F{t}`/`B{t}` span per ring step; below it, one lane of sends and one of receives. The
# receive of the next block is posted *before* the current block's compute starts, and it is waited on
# only after that compute, so the transfer runs during the compute.
#
# The top picture is the **modeled clock** (`sim.retime`, the one simulator of `minipar.sim`): the same
# run, its order and its waits kept, every span re-timed from the work it recorded. A compute span costs
# its FLOPs in units of one chunk pair, 4·b·h·c²·d with c = N/(2cp) (so a forward step of two pairs takes
# 2 units, and a backward, whose FLOPs are 10/4 of the forward's, 5); a K/V transfer costs 0.5 units,
# less than the step it hides behind. There every zigzag rank's steps are equally long, as the FLOP count
# below proves, and the transfers disappear under the compute. The bottom picture is the wall clock of
# this machine, where 4 rank processes share its CPU cores (their number is printed below): its span
# widths are mostly time-slicing, not work.

# %%
SEQ, HEADS, DIM = 2048, 4, 64

def ring_run(layout):
    r, n = runtime.rank(), runtime.world_size()
    q, k, v = (cp.shard_sequence(torch.randn(1, HEADS, SEQ, DIM, generator=torch.Generator().manual_seed(i)),
                                 r, n, layout).requires_grad_() for i in range(3))
    trace.reset()
    cp.ring_attention(q, k, v, layout=layout).sum().backward()
    return trace.gather()

evs = minipar.launch(ring_run, CP, "zigzag")[0]
PAIR = 4 * 1 * HEADS * (SEQ // (2 * CP)) ** 2 * DIM           # FLOPs of one (query chunk, key chunk) pair
modeled = sim.retime(evs, lambda e: e.flops / PAIR, p2p=0.5)
fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7))
plot_timeline(modeled, ax=top, unit="units", clock="modeled",
              title=f"zigzag ring attention, cp={CP}, N={SEQ}, modeled clock: forward F0..F3, backward B0..B3")
plot_timeline(evs, ax=bottom, title=f"the same run on the wall clock: {CP} ranks on {os.cpu_count()} CPU cores")
plt.tight_layout()
print(f"{CP} rank processes on {os.cpu_count()} CPU cores")
for name in [f"F{t}" for t in range(CP)] + [f"B{t}" for t in range(CP)]:
    widths = {e.rank: e.end - e.start for e in modeled if e.name == name}
    assert max(widths.values()) - min(widths.values()) < 1e-12 * max(widths.values()) + 1e-15, (name, widths)
print("on the modeled clock every zigzag rank's F_t and B_t take equally long, for every step t")

for r in range(CP):
    spans = {e.name: e for e in evs if e.rank == r and e.cat == "compute"}
    recvs = [e for e in evs if e.rank == r and e.name == "recv"]
    for t in range(CP - 1):  # the forward's recv of block t+1 is posted before step t starts computing
        assert recvs[t].start <= spans[f"F{t}"].start

# %% [markdown]
# The forward's FLOPs per rank, counted by torch's `FlopCounterMode` (2mnk per matmul), against the
# formula `cp.ring_flops`: each
# (query chunk, key chunk) pair costs 4·b·h·c²·d, where c is the chunk length. A diagonal pair is
# computed whole and then masked. Contiguous: rank r computes r+1 blocks. Zigzag: every rank computes 2cp+1
# half-size pairs.

# %%
from torch.utils.flop_counter import FlopCounterMode


def counted_flops(layout):
    """This rank's forward ring attention, its FLOPs counted by torch (not by our formula)."""
    r, n = runtime.rank(), runtime.world_size()
    q, k, v = (cp.shard_sequence(torch.randn(1, HEADS, SEQ, DIM, generator=torch.Generator().manual_seed(i)),
                                 r, n, layout) for i in range(3))
    with FlopCounterMode(display=False) as counter:
        cp.ring_attention(q, k, v, layout=layout)
    return counter.get_total_flops()


work = {layout: minipar.launch(counted_flops, CP, layout) for layout in ("zigzag", "contiguous")}
for layout in work:
    assert work[layout] == [cp.ring_flops(1, HEADS, SEQ, DIM, CP, r, layout) for r in range(CP)]
    mean = sum(work[layout]) / CP
    print(f"{layout:10s} GFLOP per rank: {[round(w / 1e9, 3) for w in work[layout]]}, "
          f"max/min = {max(work[layout]) / min(work[layout]):.2f}, max/mean = {max(work[layout]) / mean:.2f}")
assert len(set(work["zigzag"])) == 1                                      # balanced exactly
assert max(work["contiguous"]) / min(work["contiguous"]) == CP            # last rank: cp x the first
assert max(work["contiguous"]) / (sum(work["contiguous"]) / CP) == 2 * CP / (CP + 1)

fig, ax = plt.subplots(figsize=(6, 2.6))
for i, layout in enumerate(("contiguous", "zigzag")):
    ax.bar([r + 0.4 * i for r in range(CP)], [w / 1e9 for w in work[layout]], width=0.4, label=layout,
           color=[COLORS["all_reduce"], COLORS["F"]][i])
ax.set_xticks([r + 0.2 for r in range(CP)], [f"rank {r}" for r in range(CP)])
ax.set_ylabel("forward attention GFLOP"), ax.legend(fontsize=8), ax.set_title("causal work per rank", fontsize=10)
plt.tight_layout()

# %% [markdown]
# With contiguous, the step takes as long as the busiest rank, which does 2cp/(cp+1) = 1.6× the mean.
# Zigzag is balanced exactly, so it is at its mean. Its diagonal blocks are also half as big, so less of
# the computed work is masked away.
#
# ## DeepSpeed-Ulysses: all-to-all from sequence shards to head shards
# Before the all-to-all, rank r holds every head for its N/cp tokens. After it, rank r holds h/cp heads for
# all N tokens, and ordinary causal attention runs locally. A second all-to-all brings the output back to
# sequence shards. Each rank sends a (cp−1)/cp share of its shard and receives the same amount.

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
for ax, (title, owner) in zip(axes, (("Q, K, V sharded by sequence", lambda hd, s: s),
                                     ("after all-to-all: sharded by head", lambda hd, s: hd))):
    for hd in range(CP):
        for s in range(CP):
            ax.add_patch(Rectangle((s, hd), 1, 1, facecolor=RANK_COLORS[owner(hd, s)], edgecolor="white"))
    ax.set_xlim(0, CP), ax.set_ylim(CP, 0), ax.set_title(title, fontsize=9)
    ax.set_xticks([s + 0.5 for s in range(CP)], [f"tokens {s}" for s in range(CP)], fontsize=7)
    ax.set_yticks([hd + 0.5 for hd in range(CP)], [f"head {hd}" for hd in range(CP)], fontsize=7)
fig.legend(handles=[Rectangle((0, 0), 1, 1, color=RANK_COLORS[r], label=f"rank {r}") for r in range(CP)],
           loc="center right", fontsize=8, frameon=False)
plt.tight_layout(rect=(0, 0, 0.87, 1))
print(inspect.getsource(cp.ulysses_attention))

# %% [markdown]
# ## Communication bytes per layer, measured against the formulas
# One attention layer (b = 2, h = 4, N = 256, d = 16), forward and then backward. The trace records the
# payload of every `send` (ring) and every `all_to_all` (Ulysses) on each rank.

# %%
def bytes_per_layer():
    r, n = runtime.rank(), runtime.world_size()
    out = {}
    for method, layout in (("ring", "zigzag"), ("ulysses", "contiguous")):
        q, k, v = (cp.shard_sequence(torch.randn(2, 4, 256, 16), r, n, layout).requires_grad_() for _ in range(3))
        op = "send" if method == "ring" else "all_to_all"
        trace.reset()
        y = cp.ring_attention(q, k, v, layout=layout) if method == "ring" else cp.ulysses_attention(q, k, v)
        fwd = sum(e.bytes for e in trace.events() if e.name == op)
        trace.reset()
        y.sum().backward()
        out[method] = {"forward": fwd, "backward": sum(e.bytes for e in trace.events() if e.name == op)}
    return out

measured = minipar.launch(bytes_per_layer, CP)
formula = {"ring": cp.ring_bytes(2, 4, 256, 16, CP), "ulysses": cp.ulysses_bytes(2, 4, 256, 16, CP)}
print(f"{'':8s}{'pass':>10s}{'measured B/rank':>18s}{'formula':>10s}")
for method in formula:
    for pass_ in ("forward", "backward"):
        got = {m[method][pass_] for m in measured}
        print(f"{method:8s}{pass_:>10s}{str(sorted(got)):>18s}{formula[method][pass_]:>10,}")
        assert got == {formula[method][pass_]}

# %% [markdown]
# Ring, forward: cp − 1 = 3 K/V blocks of 2 (K and V) · b · h · N/cp · d · 4 B = 2·2·4·64·16·4 B = 64 KiB
# each (the 196,608 B measured above = 3 × 64 KiB). Backward: 3 K/V blocks plus 4 dK/dV blocks. Ulysses:
# 4 all-to-alls of b · N/cp · h · d · 4 B = 2·64·4·16·4 B = 32 KiB each. The next cell recomputes both
# blocks from the shapes. Both costs fall as 1/cp per rank.
# The ring's messages go only to the next rank and hide behind compute. Ulysses' all-to-alls wait for
# each other, and they need h % cp = 0:

# %%
kv_block = 2 * 2 * 4 * (256 // CP) * 16 * 4          # K and V of one rank's shard: 2 · b · h · N/cp · d · 4 B
a2a_block = 2 * (256 // CP) * 4 * 16 * 4             # one Q, K, V or O shard: b · N/cp · h · d · 4 B
print(f"K/V block {kv_block:,} B = {kv_block // 1024} KiB; Ulysses all-to-all {a2a_block:,} B = {a2a_block // 1024} KiB")
assert formula["ring"]["forward"] == (CP - 1) * kv_block == 3 * 64 * 1024
assert formula["ulysses"]["forward"] == 4 * a2a_block and a2a_block == 32 * 1024
try:
    cp.check_config(GPTConfig(heads=4, hidden=64), 8, "ulysses", "contiguous")
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## Memory against sequence length
# Activation memory is the tensors that autograd keeps from the forward pass for the backward pass. At the
# end of the forward pass they are all alive together (Korthikanti et al. 2022). `SavedActivations` hooks
# `saved_tensors_hooks`, counts each saved storage once, and leaves out the parameters. We run a
# 2-layer GPT (h = 64) with zigzag ring attention, one sequence per step, on 1, 2 and 4 ranks. The cp = 1
# run uses the same ring code with a single rank.
# The ring also has small transient buffers on top of this: one block of scores [b, h, c, c] and one K/V
# block in flight. Those shrink as 1/cp² and 1/cp.

# %%
SEQS = (256, 512, 1024)

def activation_bytes(seqs):
    r, n = runtime.rank(), runtime.world_size()
    out = []
    for seq in seqs:
        model = cp.parallelize_attention(GPT(GPTConfig(vocab=64, seq=seq, layers=2, heads=4, hidden=64), 0))
        x, y, pos = cp.local_batch(*SyntheticData(64, seq).batch(0, 1), r, n, "zigzag")
        with SavedActivations(model) as meter:
            model(x, y, pos=pos)
        out.append(meter.bytes)
    return out

mem = {n: [max(col) for col in zip(*minipar.launch(activation_bytes, n, SEQS))] for n in (1, 2, 4)}
fig, ax = plt.subplots(figsize=(6, 3))
for n, color in zip(mem, (COLORS["all_reduce"], COLORS["B"], COLORS["F"])):
    ax.plot(SEQS, [b / 2**20 for b in mem[n]], "o-", color=color, label=f"cp = {n}")
ax.set_xscale("log", base=2), ax.set_xticks(SEQS, [str(s) for s in SEQS])
ax.set_xlabel("sequence length N"), ax.set_ylabel("activation MiB per rank (max over ranks)")
ax.legend(fontsize=8), ax.set_title("activation memory per rank", fontsize=10)
plt.tight_layout()
for n in mem:
    print(f"cp={n}: " + ", ".join(f"N={s}: {b / 2**20:.2f} MiB ({b / mem[1][i]:.3f} of cp=1)"
                                  for i, (s, b) in enumerate(zip(SEQS, mem[n]))))
assert mem[4][-1] <= 0.35 * mem[1][-1]

# %% [markdown]
# ## A whole GPT with context parallelism
# `cp.train_rank` follows the reference loop, with every attention swapped for ring or Ulysses attention.
# `cp.local_batch` gives each rank its slice of the tokens and its *positions*, so the position embedding
# and the causal mask stay right. Each rank holds the same number of tokens. The full-sequence mean loss is
# therefore the mean of the ranks' local means: each rank backpropagates `local_loss / cp`, and the
# parameter gradients are all-reduced, as in data parallelism.

# %%
print(inspect.getsource(cp.local_batch))
CFG = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32)
ref = train_reference(CFG, steps=3, batch_size=4, seed=0)
runs = minipar.launch(lambda: {m: cp.train_rank(CFG, 3, 4, 0, *m) for m in
                               (("ring", "zigzag"), ("ulysses", "contiguous"))}, CP)[0]
for setup, res in runs.items():
    grad_err = max((res["grads"][k] - g).abs().max().item() for k, g in ref.grads.items())
    loss_err = max(abs(a - b) for a, b in zip(res["losses"], ref.losses))
    print(f"{setup}: losses {[round(x, 5) for x in res['losses']]}, max |Δloss| {loss_err:.1e}, "
          f"max |Δgrad| {grad_err:.1e}")
    assert loss_err < 1e-5 and grad_err < 1e-5

# %% [markdown]
# ## Exercise: write the merge
# Write `merge(out_a, lse_a, out_b, lse_b) -> (out, lse)`. It takes two partial attention results over
# disjoint sets of keys (`out`: [..., q, d], `lse`: [..., q]) and returns the result over their union.
# The checker starts from the empty result (out = 0, lse = −inf) and folds in three key blocks.
# It then repeats this with scores around 1000, where `exp(lse)` overflows fp32, and on randomized key
# splits, and checks that your output and lse match attention over all the keys. `cp.merge_attention` is
# switched off while your function runs.

# %%

# %% tags=["exercise"]
def merge(out_a, lse_a, out_b, lse_b):
    """The attention result over keys A and B from the results over A and over B."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("cp_merge", merge)
print(verdict)
assert verdict  # solution-only
