# %% [markdown]
# # 03 · Tensor parallelism: splitting every layer, Megatron-style
#
# Data parallelism copies the model; **tensor parallelism** (TP) splits each weight matrix over t
# ranks, so every rank stores and multiplies 1/t of it. Shoeybi et al. (2019), *Megatron-LM*, Sec. 3,
# observe that a linear layer Y = XA splits two ways:
#
# | split | rank i holds | rank i computes | to get Y |
# |---|---|---|---|
# | **column** parallel | A_i, columns of A | Y_i = X A_i | Y = [Y_1 … Y_t] (already split) |
# | **row** parallel | A_i, rows of A (and X_i) | X_i A_i | Y = Σ_i X_i A_i (a sum over ranks) |
#
# A column-parallel layer leaves Y split by columns, which is exactly the input a row-parallel
# layer wants. So an MLP (`fc` column → GELU, elementwise, local → `proj` row) and an attention
# block (`q, k, v` column: **each rank owns a/t heads** → attention, local per head → `proj` row)
# each need communication only at their two ends, done by two conjugate operators:
#
# * **f**: identity forward, all-reduce backward (the input gradient is a sum of partial ones);
# * **g**: all-reduce forward (sums the row-parallel partials), identity backward.
#
# Cost per layer and micro-batch, with b sequences of s tokens and hidden size h: **4 all-reduces
# of b·s·h elements** (2 forward, 2 backward), 12h²/t weights per rank (Megatron-LM, Sec. 3;
# Narayanan et al. 2021, Sec. 3.2). The vocabulary is split too: the embedding's rows and the
# output head's columns, and the loss is computed without ever gathering the [b, s, V] logits.

# %%
import inspect

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import minipar
from minipar import Mesh, comm, sp, tp, tp_generate, trace
from minipar.model import GPT, GPTConfig, train_reference
from minipar.plan import serving
from minipar.timeline import COLORS

RANK_COLORS = [COLORS["F"], COLORS["B"], COLORS["W"], COLORS["recompute"]]
cfg = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)

# %% [markdown]
# ## The picture: column then row
# Left: a column-parallel `fc`, each rank multiplies the whole X by its own columns. Right: a
# row-parallel `proj`, each rank multiplies its own columns of the activation by its own rows of
# the weight; the partial products are full-sized and are summed by g.

# %%
def draw_split(ax, t=4):
    def box(x, y, w, h, color, label=""):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="white", lw=1.5))
        if label:
            ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", color="white", fontsize=8)
    grey = COLORS["opt"]
    # column parallel: X [s x h] times A [h x 4h] split by columns
    box(0, 0, 2, 3, grey, "X")
    for i in range(t):
        box(2.5 + i * 1.0, 0, 1.0, 2, RANK_COLORS[i], f"A{i + 1}")
        box(7.2 + i * 1.0, 0, 1.0, 3, RANK_COLORS[i], f"Y{i + 1}")
    ax.text(2.2, 1.5, "x", ha="center"); ax.text(6.9, 1.5, "=", ha="center")
    ax.text(4.5, 3.4, "column parallel: Y_i = X A_i (no communication)", ha="center", fontsize=9)
    # row parallel: Y split by columns times B split by rows
    for i in range(t):
        box(12 + i * 1.0, 0, 1.0, 3, RANK_COLORS[i], f"Y{i + 1}")
        box(16.5, 2.6 - (i + 1) * 0.65, 2, 0.65, RANK_COLORS[i], f"B{i + 1}")
    ax.text(16.25, 1.5, "x", ha="center"); ax.text(18.9, 1.5, "= Σ", ha="center")
    box(19.6, 0, 2, 3, COLORS["all_reduce"], "Z (g)")
    ax.text(16.8, 3.4, "row parallel: Z = Σ_i Y_i B_i (all-reduce)", ha="center", fontsize=9)
    ax.set_xlim(-0.3, 22); ax.set_ylim(-0.3, 3.8); ax.axis("off")

fig, ax = plt.subplots(figsize=(11, 2.2))
draw_split(ax)
plt.show()

# %% [markdown]
# ## The code
# f and g are autograd functions in `minipar/mappings.py`, used as `mappings.f` and `mappings.g` (every byte
# they move goes through `comm`'s traced collectives):

# %%
from minipar import mappings

print(inspect.getsource(mappings._F))
print(inspect.getsource(mappings._G))

# %% [markdown]
# The two linear layers keep a slice of the reference model's full weight, so the TP model *is*
# the reference model. The column layer does not apply f itself: q, k and v read the same input, and
# one f for the three of them means one all-reduce in backward instead of three (Megatron fuses them
# into one GEMM for the same reason).

# %%
print(inspect.getsource(tp.ColumnParallelLinear))
print(inspect.getsource(tp.RowParallelLinear))
print(inspect.getsource(tp.column_parallel))
print(inspect.getsource(tp.ParallelMLP.forward))
print(inspect.getsource(tp.ParallelAttention.forward))

# %% [markdown]
# ## It is the same model: training on simulated ranks
# `tp.run_tp` checks the sizes, then runs `tp.train_tp` (the reference loop: same seed, same batches,
# 5 AdamW steps) on t ranks and puts the gradient shards back together. The losses and every
# gradient must match the single-device run.

# %%
print(inspect.getsource(tp.train_tp))
ref = train_reference(cfg, steps=5, batch_size=4)
for t in (2, 4):
    out = tp.run_tp(cfg, t, steps=5, batch_size=4)
    loss_err = max(abs(a - b) for a, b in zip(out["losses"], ref.losses))
    grad_err = max((out["grads"][n] - ref.grads[n]).abs().max().item() for n in ref.grads)
    print(f"t={t}: losses {[round(x, 4) for x in out['losses']]}  max |Δloss| {loss_err:.1e}  max |Δgrad| {grad_err:.1e}")
    assert loss_err < 1e-5 and grad_err < 1e-5
print("reference:", [round(x, 4) for x in ref.losses])

# %% [markdown]
# Sizes must divide: each rank needs whole heads, and equal slices of h, 4h and the vocabulary.
# A layout that does not fit is refused before any process starts, with the fix in the message:

# %%
try:
    tp.run_tp(cfg.replace(heads=6, hidden=48), t=4)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## Communication per layer, measured
# `sp.measure_layer` runs one transformer block forward and backward on each rank and reads the
# trace. Megatron's accounting says 4 all-reduces of b·s·h·4 bytes (fp32) per layer, whatever t is;
# the bytes a ring all-reduce puts on the wire, 2(t−1)/t of that, grow towards 2× with t.

# %%
mcfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=64)
b = 2

def one_layer():
    Mesh(tp=torch.distributed.get_world_size())
    m = sp.measure_layer(mcfg, b)
    return m["comm"], [(e.name, e.wire_bytes) for e in m["events"] if e.cat == "comm"]

print(f"{'t':>2} {'measured (count, payload B)':>36} {'formula':>28} {'wire B/rank':>12}")
for t in (2, 4):
    measured, wire = minipar.launch(one_layer, t)[0]
    formula = sp.comm_per_layer(b, mcfg.seq, mcfg.hidden, t)
    print(f"{t:>2} {str(measured):>36} {str(formula):>28} {sum(w for _, w in wire):>12,.0f}")
    assert measured == formula

# %% [markdown]
# ## The vocab-parallel loss
# The head is column parallel, so rank i holds logits for tokens [iV/t, (i+1)V/t) only. Megatron's
# cross-entropy (`cross_entropy.py`) needs three all-reduces of **one number per token**: the
# maximum (for a stable exp), the target's logit (only its owner has it), and the sum of exps.
# loss_n = log Σ_v exp(z_nv) − z_n,target; backward is local: softmax − onehot on this rank's columns.

# %%
print(inspect.getsource(tp._VocabParallelCrossEntropy))

# %%
gen = torch.Generator().manual_seed(0)
logits = torch.randn(64, cfg.vocab, generator=gen) * 4
target = torch.randint(0, cfg.vocab, (64,), generator=gen)
want = F.cross_entropy(logits, target)

def parallel_loss():
    Mesh(tp=torch.distributed.get_world_size())
    shard = logits.chunk(comm.size("tp"), -1)[comm.local_rank("tp")]
    loss = tp.vocab_parallel_cross_entropy(shard, target)
    evs = [e for e in trace.events() if e.cat == "comm"]
    return loss.item(), tuple(shard.shape), [(e.name, e.meta, e.bytes) for e in evs]

for t in (2, 4):
    loss, shape, evs = minipar.launch(parallel_loss, t)[0]
    print(f"t={t}: loss {loss:.6f} vs F.cross_entropy {want.item():.6f}; logits per rank {shape}; "
          f"comm: {len(evs)} all-reduces of {evs[0][2]} B (= 64 tokens x 4 B)")
    assert abs(loss - want.item()) < 1e-5 and shape == (64, cfg.vocab // t) and len(evs) == 3

# %% [markdown]
# (`tests/test_tp.py` also compares it, value and gradient, with DTensor's `loss_parallel`.)
#
# ## Inference: greedy decoding with a KV cache under TP
# Decoding a token reads every weight once: it is memory-bound, and TP divides the bytes each device
# reads by t, at the price of 2 small all-reduces per layer per token. Each rank caches K and V of
# its own a/t heads. `tp_generate.generate` must produce exactly the tokens of `GPT.generate`.

# %%
print(inspect.getsource(tp_generate._attend))

# %%
gcfg = GPTConfig(vocab=64, seq=48, layers=2, heads=4, hidden=32)
prompt = torch.randint(0, gcfg.vocab, (2, 8), generator=torch.Generator().manual_seed(1))
want = GPT(gcfg, 0).generate(prompt, 32)

def decode():
    Mesh(tp=torch.distributed.get_world_size())
    return tp_generate.generate(tp.TPGPT(GPT(gcfg, 0)), prompt, 32)

for t in (1, 2, 4):
    got = minipar.launch(decode, t)
    assert all(torch.equal(g, want) for g in got)
print("32 tokens, identical to GPT.generate for t = 1, 2, 4:", want[0, 8:].tolist())

# %% [markdown]
# Per-token latency against t. On this machine the ranks share its CPU cores (the count is printed
# below) and talk over gloo, so adding ranks only adds latency; on GPUs the roofline of
# `minipar.plan.serving` (weights and KV cache 2Ψ'/t + cache over HBM bandwidth, plus 2L all-reduces of b·h values per token; H100 SXM from
# the planner's hardware table) shows why TP is the standard way to cut decode latency (notebook 11
# takes this further: PP, continuous batching, paged caches):

# %%
import os

lcfg = GPTConfig(vocab=512, seq=64, layers=4, heads=8, hidden=256)
LLAMA_7B = serving.ServingModel("7b", 32, 4096, 32, 32, 11008, 32000, True, "Llama 2 7B (Touvron et al. 2023)")

def latency():
    Mesh(tp=torch.distributed.get_world_size())
    return tp_generate.decode_latency(tp.TPGPT(GPT(lcfg, 0)), torch.zeros(1, 8, dtype=torch.long), 24, repeats=2)

print(f"{os.cpu_count()} CPU cores on this machine")
print(f"{'t':>2} {'CPU ms/token (measured)':>24} {'H100 ms/token, 7B model (modeled)':>36}")
for t in (1, 2, 4):
    cpu = minipar.launch(latency, t)[0]
    gpu = serving.token_latency(LLAMA_7B, serving.Layout(tp=t), "h100", batch=1, context=1024)
    print(f"{t:>2} {cpu * 1e3:>24.2f} {gpu * 1e3:>36.2f}")
assert serving.token_latency(LLAMA_7B, serving.Layout(tp=4)) < serving.token_latency(LLAMA_7B, serving.Layout(tp=1))

# %% [markdown]
# ## Exercise: Megatron's parallel MLP from its shards
# Write `parallel_mlp(x, fc_w, fc_b, proj_w, proj_b, group)`: `x` is the same [b, s, h] on every rank,
# `fc_w, fc_b` this rank's rows of `fc` (column parallel), `proj_w` this rank's columns of `proj`
# (row parallel), `proj_b` the whole bias. Use `mappings.f`, `mappings.g`, `F.linear` and `F.gelu`. The
# checker runs it on 2 and 4 ranks against the single-device MLP: output, input gradient, and the gradient
# of every shard. (Two classic bugs it catches: forgetting f, and adding the bias before g, which
# adds it t times.)

# %%
from minipar.exercises import NotYet, check


# %% tags=["exercise"]
def parallel_mlp(x, fc_w, fc_b, proj_w, proj_b, group):
    """Megatron's MLP from its shards: f -> column-parallel fc -> GELU -> row-parallel proj -> g, bias once."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("tp_mlp", parallel_mlp)
print(verdict)
assert verdict  # solution-only
