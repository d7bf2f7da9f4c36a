# %% [markdown]
# # 04 · Sequence parallelism: splitting what tensor parallelism left whole
#
# Tensor parallelism (notebook 03) splits the GEMMs of attention and the MLP over t ranks, but the
# LayerNorms, the residual adds and (in training) dropout still run on the whole [b, s, h] activation
# on every rank, and store it for backward. Korthikanti et al. (2022), *Reducing Activation
# Recomputation in Large Transformer Models*, Sec. 4.2.2, split those regions along the
# **sequence** instead, and replace each of TP's all-reduces by its two halves:
#
# | | enter a TP region | leave it |
# |---|---|---|
# | TP | f: identity (backward: all-reduce) | g: all-reduce (backward: identity) |
# | TP + SP | all-gather along s (backward: reduce-scatter) | reduce-scatter along s (backward: all-gather) |
#
# An all-reduce *is* a reduce-scatter followed by an all-gather, so the bytes on the wire stay the
# same. What changes is memory. The paper's activation bytes per layer (Sec. 4, 2-byte activations,
# a heads, 1-byte dropout masks):
#
# $$\text{TP: } sbh\Big(10 + \frac{24}{t} + \frac{5as}{ht}\Big) \qquad\qquad \text{TP+SP: } sbh\Big(\frac{34}{t} + \frac{5as}{ht}\Big)$$
#
# **Adapted to minipar's GPT** (`minipar.sp.activation_bytes`): fp32 doubles every 2-byte term;
# there is no dropout, so the two 1-byte masks (2sbh) and the s×s dropout mask go; fused SDPA keeps no
# s×s matrix (the 5as/(ht) term) but its output and a log-sum-exp of `a` floats per token; LayerNorm
# also keeps 2 floats per token. With B = 4 bytes:
#
# $$\text{TP: } sbh\Big(16 + \frac{48}{t}\Big) + sb\Big(16 + \frac{4a}{t}\Big) \qquad\qquad \text{TP+SP: } \frac{64\,sbh + (16 + 4a)\,sb}{t}$$
#
# The sbh parts are exactly twice the paper's without its dropout masks: (10 − 2)·2 = 16, 24·2 = 48
# and (34 − 2)·2 = 64.

# %%
import inspect

import matplotlib.pyplot as plt
import torch

import minipar
from minipar import Mesh, mappings, sp, tp
from minipar.model import GPTConfig, train_reference
from minipar.timeline import COLORS, plot_timeline

cfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=64)
b = 2

# %% [markdown]
# ## The picture: one layer under TP + SP
# Blue regions hold s/t tokens of the full hidden size; green regions hold all s tokens but a/t heads
# (or 4h/t MLP columns). The operators between them are the collectives.

# %%
def draw_layer(ax):
    parts = [("LN1\n[b, s/t, h]", COLORS["F"], 1.6), ("all-gather\n(s)", COLORS["all_gather"], 1.2),
             ("q k v, SDPA, proj\n[b, s, h/t]", COLORS["B"], 2.4), ("reduce-\nscatter (s)", COLORS["reduce_scatter"], 1.2),
             ("+ residual, LN2\n[b, s/t, h]", COLORS["F"], 2.0), ("all-gather\n(s)", COLORS["all_gather"], 1.2),
             ("fc, GELU, proj\n[b, s, 4h/t]", COLORS["B"], 2.2), ("reduce-\nscatter (s)", COLORS["reduce_scatter"], 1.2),
             ("+ residual\n[b, s/t, h]", COLORS["F"], 1.5)]
    x = 0
    for label, color, w in parts:
        ax.add_patch(plt.Rectangle((x, 0), w - 0.1, 1, facecolor=color, edgecolor="white"))
        ax.text(x + w / 2 - 0.05, 0.5, label, ha="center", va="center", color="white", fontsize=8)
        x += w
    ax.set_xlim(0, x); ax.set_ylim(0, 1); ax.axis("off")

fig, ax = plt.subplots(figsize=(12, 1.4))
draw_layer(ax)
ax.set_title("one transformer layer under TP + SP, in order (shapes per rank)", fontsize=10)
plt.show()

# %% [markdown]
# ## The code
# Entering a region is the paper's all-gather, `mappings.gather_along` (backward: reduce-scatter), in
# front of the column-parallel GEMMs. Megatron fuses the two into one autograd function for one more
# trick from the paper: backward needs the gathered input again for
# the weight gradient. Storing it would keep a full sbh tensor; Megatron stores the s/t shard and
# **all-gathers it again in backward**, overlapped with the input-gradient GEMM (`regather=True`).
# The reduce-scatter of the input gradient overlaps the weight-gradient GEMMs in turn.

# %%
print(inspect.getsource(tp.column_parallel))
print(inspect.getsource(mappings._GatherLinear))

# %% [markdown]
# Leaving a region is `RowParallelLinear` with `mappings.reduce_scatter_along` in place of g (see
# notebook 03). One consequence: LayerNorm weights, row biases and position embeddings now see only
# s/t tokens on each rank, so their gradients are partial sums, added up once per step:

# %%
print(inspect.getsource(mappings.sync_sequence_parallel_grads))

# %% [markdown]
# ## Activation memory against t, measured
# `sp.measure_layer` runs one block forward under `minipar.activations.SavedActivations`, which
# records every tensor autograd saves for backward through `saved_tensors_hooks` (each storage
# once, parameters excluded), then runs backward and reads the trace.

# %%
MODES = {"TP": (False, True), "TP+SP": (True, True), "TP+SP, no regather": (True, False)}

def measure_all():
    Mesh(tp=torch.distributed.get_world_size())
    return {name: sp.measure_layer(cfg, b, sequence_parallel=s, regather=r) for name, (s, r) in MODES.items()}

every_rank = {t: minipar.launch(measure_all, t) for t in (1, 2, 4)}
runs = {t: ranks[0] for t, ranks in every_rank.items()}  # rank 0's numbers (all ranks measure the same)

print(f"{'t':>2} {'mode':<20}{'measured B':>12}{'formula B':>12}{'error':>8}{'paper B (2-byte)':>18}")
for t, run in runs.items():
    for name, (s_, r_) in MODES.items():
        got = run[name]["activation_bytes"]
        want = sp.activation_bytes(cfg.seq, b, cfg.hidden, cfg.heads, t, s_, r_)
        paper = sp.korthikanti_bytes(cfg.seq, b, cfg.hidden, cfg.heads, t, s_)
        print(f"{t:>2} {name:<20}{got:>12,}{want:>12,.0f}{(got - want) / want:>8.1%}{paper:>18,.0f}")
        assert got == want   # claimed exact: every term is a tensor autograd saves

# %%
ts = [1, 2, 4]
fig, ax = plt.subplots(figsize=(6, 3.2))
for (name, (s_, r_)), color in zip(MODES.items(), [COLORS["all_reduce"], COLORS["F"], COLORS["recompute"]]):
    ax.plot(ts, [runs[t][name]["activation_bytes"] / 1024 for t in ts], "o", color=color, label=f"{name} (measured)")
    ax.plot(ts, [sp.activation_bytes(cfg.seq, b, cfg.hidden, cfg.heads, t, s_, r_) / 1024 for t in ts], "-",
            color=color, alpha=0.6)
ax.set_xlabel("tensor-parallel size t"); ax.set_ylabel("KiB saved for backward, per layer")
ax.set_xticks(ts); ax.legend(fontsize=8); ax.set_title("lines: formula, dots: measured", fontsize=9)
plt.show()
one = runs[1]["TP"]["activation_bytes"]
for t in (2, 4):
    assert runs[t]["TP+SP"]["activation_bytes"] * t == one   # SP divides every stored byte by t
    print(f"t={t}: TP keeps {runs[t]['TP']['activation_bytes'] / one:.0%} of the t=1 bytes, TP+SP {1 / t:.0%}")

# %% [markdown]
# ## Communication: the same volume, re-shaped
# Per layer and micro-batch, with M = b·s·h·4 bytes: TP does 4 all-reduces of M. SP does 4
# reduce-scatters and 4 all-gathers of M, plus the 2 re-gathers of backward when the shard is stored.
# In ring bytes on the wire, an all-reduce costs 2(t−1)/t·M and each half (t−1)/t·M: equal totals.

# %%
print(f"{'t':>2} {'mode':<20}{'measured (count, payload B)':>66}{'wire B':>10}")
for t in (2, 4):
    for name, (s_, r_) in MODES.items():
        m = runs[t][name]
        assert m["comm"] == sp.comm_per_layer(b, cfg.seq, cfg.hidden, t, s_, r_)
        wire = sum(e.wire_bytes for e in m["events"] if e.cat == "comm")
        print(f"{t:>2} {name:<20}{str(m['comm']):>66}{wire:>10,.0f}")
    wire_of = lambda n: sum(e.wire_bytes for e in runs[t][n]["events"] if e.cat == "comm")
    assert wire_of("TP") == wire_of("TP+SP, no regather")

# %% [markdown]
# The pattern on a timeline: one layer forward (F) and backward (B) under TP+SP on 4 ranks. Forward
# alternates all-gather and reduce-scatter; backward mirrors it, with each re-gather issued
# asynchronously next to the input-gradient GEMM.

# %%
import os

evs = minipar.trace.merge([r["TP+SP"]["events"] for r in every_rank[4]])
fig, ax = plt.subplots(figsize=(11, 3.2))
plot_timeline(evs, ax=ax, title=f"TP+SP, one layer on 4 ranks (wall clock, 4 ranks on {os.cpu_count()} CPU cores)")
plt.show()
print("rank 0, in issue order:", [e.name for e in evs if e.cat == "comm" and e.rank == 0])

# %% [markdown]
# ## Still the same model
# Training the whole GPT with TP+SP on simulated ranks reproduces the single-device losses.

# %%
tcfg = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)
ref = train_reference(tcfg, steps=5, batch_size=4)

def train_sp():
    Mesh(tp=torch.distributed.get_world_size())
    return tp.train_tp(tcfg, steps=5, batch_size=4, sequence_parallel=True)["losses"]

for t in (2, 4):
    losses = minipar.launch(train_sp, t)[0]
    err = max(abs(a - b_) for a, b_ in zip(losses, ref.losses))
    print(f"t={t}: max |Δloss| vs reference over 5 steps: {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ## Exercise: the MLP under sequence parallelism
# Write `sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group)`: `x_shard` is this rank's [b, s/t, h]
# chunk of the sequence, `fc_w, fc_b` its rows of `fc`, `proj_w` its columns of `proj`, `proj_b` the
# whole bias; return this rank's [b, s/t, h] chunk of the output. Use `mappings.gather_along` and
# `mappings.reduce_scatter_along` (dimension 1 is the sequence). The checker compares output and
# gradients with the single-device MLP on 2 ranks, and checks that the communication is one
# all-gather and one reduce-scatter each way (an all-reduce followed by keeping your chunk gives the
# right numbers with twice the wire bytes).

# %%
from minipar.exercises import NotYet, check


# %% tags=["exercise"]
def sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group):
    """The MLP under sequence parallelism: all-gather(s) -> column -> GELU -> row -> reduce-scatter(s)."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("sp_mlp", sp_mlp)
print(verdict)
assert verdict  # solution-only
