# %% [markdown]
# # 01 · Data parallelism: buckets, overlap, accumulation
#
# **The idea.** Every rank holds a full replica of the model and a different slice of the global
# batch. After backward, every gradient is averaged over the N ranks, so every replica takes the
# same optimizer step and the replicas never drift apart:
#
# $$g = \frac{1}{N}\sum_{r=0}^{N-1} \nabla L_r(w)$$
#
# One all-reduce of the Ψ gradient elements per step. With G bytes per gradient element, a ring
# all-reduce puts $2\frac{N-1}{N}\,G\Psi$ bytes on the wire per rank (a reduce-scatter plus an
# all-gather, the "2Ψ" of the ZeRO paper). Memory is not shared at all: each rank holds
# $(P + G + K)\Psi$ bytes of parameters, gradients and optimizer state.
#
# Source: Li et al. 2020, *PyTorch Distributed: Experiences on Accelerating Data Parallel Training*
# (VLDB), Sec. 3.2: gradient **bucketing** and **overlapping** communication with backward.

# %%
import inspect

import matplotlib.pyplot as plt
import torch

import minipar
from minipar import trace
from minipar.activations import SavedActivations
from minipar.dp import DDP, train_ddp, train_steps
from minipar.model import GPT, GPTConfig, make_optimizer, train_reference
from minipar.plan import model_state_bytes
from minipar.recompute import apply_recompute
from minipar.timeline import COLORS, plot_timeline

CFG = GPTConfig(vocab=64, seq=32, layers=4, heads=4, hidden=32)
N = 4
PSI = sum(p.numel() for p in GPT(CFG).parameters())
print(f"Ψ = {PSI:,} parameters")

# %% [markdown]
# ## The picture: buckets in reverse order
# Backward produces gradients from the last layer to the first, so DDP packs parameters into
# buckets in *reverse* registration order. A bucket's all-reduce starts as soon as its last
# gradient lands, while backward continues on earlier layers. One all-reduce per parameter would
# pay the per-message latency α hundreds of times; one for the whole model could not start before
# backward ends. Here, with a 64 KiB cap:

# %%
model = GPT(CFG)
ddp = DDP(model, bucket_mb=1 / 16, broadcast_params=False)
names = {id(p): n for n, p in model.named_parameters()}
fig, ax = plt.subplots(figsize=(10, 2.2))
x = 0
palette = [COLORS["all_reduce"], COLORS["all_gather"], COLORS["reduce_scatter"], COLORS["F"], COLORS["B"]]
for i, b in enumerate(ddp.buckets):
    for p in b.params:
        ax.barh(0, p.numel() * 4 / 1024, left=x, color=palette[i % len(palette)], edgecolor="white")
        x += p.numel() * 4 / 1024
    ax.text(x - b.buffer.numel() * 2 / 1024, 0, f"bucket {i}", ha="center", va="center", fontsize=9, color="white")
ax.set_yticks([]); ax.set_xlabel("gradient bytes (KiB), in the order backward produces them")
ax.set_title(f"{len(ddp.buckets)} buckets; first: {names[id(ddp.buckets[0].params[0])]}, "
             f"last: {names[id(ddp.buckets[-1].params[-1])]}")
plt.show()

# %% [markdown]
# ## The code
# Each parameter gets a hook that fires once its gradient has been accumulated. The hook counts
# the bucket's ready gradients and launches every *consecutive* ready bucket, in order, so that
# every rank issues the same collectives in the same order. The gradients live inside the bucket
# buffers (`p.grad` is a view), so there is nothing to copy in or out.

# %%
print(inspect.getsource(DDP._hook))
print(inspect.getsource(DDP._launch_ready))
print(inspect.getsource(DDP._finish))

# %% [markdown]
# ## Run it on 4 simulated ranks, against the single-device loop
# Same seed, same global batch of 8 sequences: each rank sees 2 of the 8. Three checks, each as
# sharp as its quantity allows in fp32:
#
# * **the gradients after the first backward**, every one, relative to its largest entry: this is
#   what DDP computes, so it must match to rounding (a sum where a mean belongs would be off by N);
# * **the losses over 5 AdamW steps**;
# * **the parameters after 5 SGD steps**. Not after AdamW: Adam's update g/(√v + ε) divides out the
#   gradient's magnitude, so a gradient element that is almost zero, whose rounding differs with the
#   summation order or the CPU's kernels, moves its parameter by up to lr = 3e-3 per step. SGD moves it
#   by lr times that rounding difference, so its parameters can be held to 1e-6.

# %%
ref = train_reference(CFG, steps=5, batch_size=8)
runs = minipar.launch(train_ddp, N, CFG, steps=5, batch_size=8)
first = train_reference(CFG, steps=1, batch_size=8).grads
scale = max(g.abs().max().item() for g in first.values())   # a key bias's zero gradient is rounding at this scale
grad_err = max((runs[r]["first_grads"][n] - g).abs().max().item() / (g.abs().max().item() + 1e-2 * scale)
               for r in range(N) for n, g in first.items())
loss_err = max(abs(a - b) for a, b in zip(runs[0]["losses"], ref.losses))
sgd = minipar.launch(train_ddp, N, CFG, steps=5, batch_size=8, kind="sgd")
sgd_ref = train_reference(CFG, steps=5, batch_size=8, kind="sgd").model
param_err = max((sgd[r]["params"][n] - p).abs().max().item() / (p.abs().max().item() + 1e-2)
                for r in range(N) for n, p in sgd_ref.named_parameters())
print("losses (DDP):      ", [f"{l:.5f}" for l in runs[0]["losses"]])
print("losses (reference):", [f"{l:.5f}" for l in ref.losses])
print(f"first-step gradients, largest relative difference over all ranks: {grad_err:.1e}")
print(f"parameters after 5 SGD steps, largest relative difference:       {param_err:.1e}")
assert grad_err < 1e-5 and loss_err < 1e-5 and param_err < 1e-6

# %% [markdown]
# ## Overlap, on a timeline
# Two ranks, small buckets. The compute lane shows forward (F), backward (B) and the optimizer;
# the communication lane shows each bucket's all-reduce, starting *inside* B. Gloo runs the
# collectives on its own thread, so here they really do proceed while backward computes.

# %%
def timeline_run(bucket_mb):
    torch.manual_seed(0)
    model = GPT(CFG, 0)
    ddp = DDP(model, bucket_mb=bucket_mb)
    opt = make_optimizer(model.parameters())
    train_steps(ddp, opt.step, CFG, steps=2, batch_size=8)  # warm-up
    trace.reset()
    train_steps(ddp, opt.step, CFG, steps=1, batch_size=8)
    return trace.events(), len(ddp.buckets)

per_rank = minipar.launch(timeline_run, 2, 1 / 16)
evs = trace.merge([e for e, _ in per_rank])
plot_timeline([e for e in evs if e.cat == "comm" or e.name in ("F", "B", "opt")], title="DDP, one step: bucketed all-reduce overlaps backward")
plt.show()
backward = [e for e in evs if e.name == "B" and e.rank == 0][0]
reduces = [e for e in evs if e.name == "all_reduce" and e.rank == 0]
started_inside = sum(backward.start < e.start < backward.end for e in reduces)
print(f"{started_inside} of {len(reduces)} all-reduces start before backward ends")
assert len(reduces) == per_rank[0][1] and started_inside >= len(reduces) - 1

# %% [markdown]
# ## Measured against the formula
# **Communication.** The trace records every byte: per step, one all-reduce of all Ψ fp32
# gradients (payload $4\Psi$ bytes), which a ring sends as $2\frac{N-1}{N}\cdot 4\Psi$ bytes.
#
# **Memory.** On the live run we count what each rank holds: parameters, gradients (the bucket
# buffers) and AdamW's two fp32 moments, K = 8 bytes per parameter (fp32 training: the parameter is
# its own master copy). AdamW's per-tensor `step` counters are scalars, reported apart.
# The ZeRO formula for stage 0 with these dtypes is `model_state_bytes(Ψ, N, 0, k=8, param_bytes=4, grad_bytes=4)`.

# %%
def measure():
    trace.reset()
    out = train_ddp(CFG, steps=3, batch_size=8)
    out["reduces"] = [(e.bytes, e.wire_bytes) for e in trace.events() if e.name == "all_reduce"]
    return out

m = minipar.launch(measure, N)[0]
payload = sum(b for b, _ in m["reduces"]) / 3
wire = sum(w for _, w in m["reduces"]) / 3
mem = m["memory"]
formula = model_state_bytes(PSI, N, 0, k=8, param_bytes=4, grad_bytes=4)
print(f"per step: payload {payload:,.0f} B (4Ψ = {4 * PSI:,}), wire {wire:,.0f} B (2(N-1)/N·4Ψ = {2 * (N - 1) / N * 4 * PSI:,.0f})")
print(f"model states per rank: params {mem['params']:,} + grads {mem['grads']:,} + AdamW moments {mem['optimizer']:,} "
      f"= {mem['params'] + mem['grads'] + mem['optimizer']:,} B; formula (4+4+8)Ψ = {formula:,.0f} B "
      f"(+ {mem['optimizer_scalars']} B of step counters)")
assert payload == 4 * PSI and abs(wire - 2 * (N - 1) / N * 4 * PSI) < 1e-6
assert mem["params"] + mem["grads"] + mem["optimizer"] == formula

# %% [markdown]
# ## Gradient accumulation with `no_sync`
# With k micro-batches per step, only the last backward needs to communicate: the others add
# their gradients into the bucket buffers locally. `train_steps` wraps the first k−1 in
# `ddp.no_sync()`. 2 ranks x 4 micro-batches of 2 rows are compared with one device running 8
# micro-batches of 2 rows (same shapes, so the same rounding inside each micro-batch), and there is
# still one all-reduce per bucket per step:

# %%
def accumulate():
    trace.reset()
    out = train_ddp(CFG, steps=3, batch_size=16, grad_accum=4, bucket_mb=1 / 16)
    out["calls"] = sum(e.name == "all_reduce" for e in trace.events())
    return out

acc = minipar.launch(accumulate, 2)[0]
ref8 = train_reference(CFG, steps=3, batch_size=16, grad_accum=8)
err = max((acc["params"][n] - p).abs().max().item() for n, p in ref8.model.named_parameters())
print(f"{acc['calls']} all-reduces in 3 steps x 4 micro-batches ({len(ddp.buckets)} buckets); max parameter error {err:.1e}")
assert acc["calls"] == 3 * len(ddp.buckets) and err < 1e-5

# %% [markdown]
# ## Activation recompute
# Backward needs the forward's activations. Full recompute keeps only each block's input and
# reruns the block in backward (one extra forward, about +33% FLOPs); selective recompute
# (Korthikanti et al. 2022, Sec. 5) reruns only the attention core softmax(QKᵀ)V, whose
# $5as^2b$ bytes per layer dominate at long sequences, for few FLOPs. Measured with
# `minipar.activations.SavedActivations`: the bytes autograd saves for backward (a checkpoint
# keeps each block's input itself, $4sbh$ bytes in fp32, which the meter does not see), and the
# gradients, which are bit-for-bit the same.
#
# Selective saves little here, and that is a finding, not a bug: the reference model calls the
# fused `scaled_dot_product_attention`, which (like FlashAttention) never stores the s×s scores,
# only its output and row statistics. Fused attention made the paper's biggest saving automatic.

# %%
x, y = minipar.model.SyntheticData(CFG.vocab, CFG.seq).batch(0, 8)
saved, grads = {}, {}
for mode in (None, "selective", "full"):
    mdl = GPT(CFG)
    if mode:
        apply_recompute(mdl, mode)
    with SavedActivations(mdl) as meter:
        _, loss = mdl(x, y)
    saved[mode] = meter.bytes
    loss.backward()
    grads[mode] = [p.grad for p in mdl.parameters()]
for mode, b in saved.items():
    print(f"{str(mode):>9}: {b / 1024:8.1f} KiB saved for backward")
assert saved["full"] < saved["selective"] < saved[None]
assert all(torch.equal(a, b) for m in ("selective", "full") for a, b in zip(grads[m], grads[None]))

# %% [markdown]
# ## Exercise: average the gradients yourself
# Write `allreduce_gradients(model)`: after each rank's backward on its own slice of the batch,
# make every `p.grad` the average over all ranks, in place, using `minipar.comm`. The checker runs
# it on 2 and 4 ranks and compares with one device that sees the whole batch.

# %%
from minipar.exercises import NotYet, check


# %% tags=["exercise"]
def allreduce_gradients(model):
    """Make every p.grad the average over the ranks, in place."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("dp_allreduce", allreduce_gradients)
print(verdict)
assert verdict  # solution-only
