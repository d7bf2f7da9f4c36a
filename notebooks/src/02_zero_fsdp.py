# %% [markdown]
# # 02 · ZeRO and FSDP: sharding the model states
#
# Data parallelism replicates everything: with Ψ parameters, every rank holds the parameters,
# the gradients and the optimizer state. ZeRO (Rajbhandari et al. 2020, *ZeRO: Memory
# Optimizations Toward Training Trillion Parameter Models*, SC20, Sec. 5 and 7) removes that
# redundancy in three stages. With P and G bytes per parameter and gradient element and K bytes
# of optimizer state per parameter (the paper: 16-bit P = G = 2, Adam with fp32 master weights
# K = 12), per rank of N:
#
# | ZeRO stage | shards | FSDP name | model states per rank | traffic per step |
# |---|---|---|---|---|
# | 0 (DDP) | nothing | `NO_SHARD` | $(P+G+K)\Psi$ | all-reduce: $2\Psi$ |
# | 1 ($P_{os}$) | optimizer state | — | $(P+G)\Psi + K\Psi/N$ | reduce-scatter + all-gather: $2\Psi$ |
# | 2 ($P_{os+g}$) | + gradients | `SHARD_GRAD_OP` | $P\Psi + (G+K)\Psi/N$ | reduce-scatter + all-gather: $2\Psi$ |
# | 3 ($P_{os+g+p}$) | + parameters | `FULL_SHARD` | $(P+G+K)\Psi/N$ | 2 all-gathers + reduce-scatter: $3\Psi$ |
#
# (A ring all-reduce *is* a reduce-scatter followed by an all-gather, hence "2Ψ"; on the wire each
# Ψ costs (N−1)/N of its bytes.) Stage 3 gathers every parameter twice, once before its forward and
# once before its backward: 1.5× DDP's traffic for N× less memory.

# %%
import inspect

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

import minipar
from minipar import trace
from minipar.dp import train_ddp, train_steps
from minipar.exercises import NotYet
from minipar.explore import explorer
from minipar.model import GPT, GPTConfig, train_reference
from minipar.plan import model_state_bytes
from minipar.precision import MixedPrecision
from minipar.timeline import COLORS, plot_timeline
from minipar.zero import FSDP_NAMES, Unit, ZeRO, train_zero

print("FSDP's names for the stages:", FSDP_NAMES)

# %% [markdown]
# ## The paper's own numbers
# Figure 1 of the paper: Ψ = 7.5 B parameters on N = 64 GPUs, K = 12. `minipar.plan.model_state_bytes`
# is the formula; it reproduces the paper's 120 GB, 31.4 GB, 16.6 GB and 1.9 GB.

# %%
paper = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}
ours = {s: model_state_bytes(7.5e9, 64, s) / 1e9 for s in range(4)}
for s in range(4):
    print(f"stage {s}: formula {ours[s]:6.2f} GB   paper {paper[s]:6.1f} GB")
    assert abs(ours[s] - paper[s]) < 0.05
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.bar([f"stage {s}" for s in range(4)], [ours[s] for s in range(4)], color=[COLORS["F"], COLORS["B"], COLORS["W"], COLORS["all_gather"]])
ax.set_yscale("log"); ax.set_ylabel("GB per GPU"); ax.set_title("Ψ = 7.5B, N = 64, K = 12 (ZeRO Fig. 1)")
plt.show()

# %% [markdown]
# ## The code
# The model is cut into **units** (FSDP's wrapped modules): the embeddings, each block, the head.
# A unit's parameters become views into one flat buffer (FSDP's `FlatParameter`), padded with zeros
# to a multiple of N so that it splits into N equal shards; rank r owns shard r. AdamW is
# elementwise, so stepping a flat shard equals stepping the parameters it covers, and the padding
# (zero weight, zero gradient) stays zero.

# %%
print(inspect.getsource(Unit.__init__))

# %% [markdown]
# Stage 3 adds four hooks: gather before a unit's forward (and prefetch the next unit), free after
# it; gather again when the gradient reaches the unit's output (and prefetch the unit before it);
# once all of the unit's gradients are in, reduce-scatter them and free the unit. Freeing resizes
# the flat buffer's storage to 0 bytes: the parameter views stay valid, only their memory goes.

# %%
for fn in (ZeRO._pre_forward, ZeRO._post_forward, ZeRO._pre_backward, ZeRO._grad_hook, ZeRO.step):
    print(inspect.getsource(fn))

# %% [markdown]
# ## Every stage on 4 simulated ranks, against the single-device loop
# A model whose units all have an odd number of parameters, so that every flat buffer needs
# padding on 4 ranks. Each configuration trains 5 AdamW steps from the same seed; we record the
# trace (every byte) and the model states each rank holds, measured before the last step.

# %%
CFG = GPTConfig(vocab=61, seq=16, layers=2, heads=3, hidden=27)
N = 4
ENGINES = {"DDP": dict(), "ZeRO-1": dict(stage=1), "ZeRO-2": dict(stage=2), "ZeRO-3": dict(stage=3),
           "ZeRO-3 + offload": dict(stage=3, offload=True)}


def every_stage():
    out = {}
    for name, kw in ENGINES.items():
        trace.reset()
        res = train_ddp(CFG, steps=5) if name == "DDP" else train_zero(CFG, **kw, steps=5)
        comm = [e for e in trace.events() if e.cat == "comm"]
        res["wire"] = {op: sum(e.wire_bytes for e in comm if e.name == op) / 5 for op in {e.name for e in comm}}
        out[name] = res
    for stage in (1, 2, 3):  # the paper's setting: 16-bit compute, fp32 master weights
        out["bf16", stage] = train_zero(CFG, stage, steps=3, precision=MixedPrecision("bf16"))["memory"]
    return out


results = minipar.launch(every_stage, N)
res = results[0]
ref = train_reference(CFG, steps=5, batch_size=8)
PSI = res["DDP"]["num_params"]
for name in ENGINES:
    err = max((results[r][name]["params"][n] - p).abs().max().item()
              for r in range(N) for n, p in ref.model.named_parameters())
    dl = max(abs(a - b) for a, b in zip(res[name]["losses"], ref.losses))
    print(f"{name:>17}: max loss difference {dl:.1e}, max parameter difference {err:.1e}")
    assert dl < 1e-5 and err < 1e-5

# %% [markdown]
# ## Memory per stage, measured against the formula
# What each rank holds, counted on the live run: parameters (flat buffers and owned shards; a freed
# buffer counts 0), gradients (full, or the shard), optimizer state (AdamW's momentum and variance;
# a separate fp32 master where there is one). This run is fp32: P = G = 4 and K = 8, since the fp32
# parameter is its own master. With offload the master is a separate fp32 copy on the host, K = 12.
# The formula is evaluated at the **padded** Ψ' (each unit rounded up to a multiple of N):
# they agree to the byte, and Ψ' − Ψ is the padding.

# %%
STAGE = {"DDP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3, "ZeRO-3 + offload": 3}
fig, ax = plt.subplots(figsize=(9, 3.2))
for i, name in enumerate(ENGINES):
    m = res[name]["memory"]
    padded = res[name].get("padded_params", PSI)
    k = 12 if "offload" in name else 8
    formula = model_state_bytes(padded, N, STAGE[name], k=k, param_bytes=4, grad_bytes=4)
    measured = m["params"] + m["grads"] + m["optimizer"]
    print(f"{name:>17}: params {m['params']:>7,} + grads {m['grads']:>7,} + optimizer {m['optimizer']:>7,} "
          f"= {measured:>7,} B; formula at Ψ'={padded:,}: {formula:>9,.0f} B; padding {padded - PSI} elements")
    assert measured == formula
    bottom = 0
    for part, c in (("params", COLORS["F"]), ("grads", COLORS["B"]), ("optimizer", COLORS["opt"])):
        ax.bar(i, m[part] / 1024, bottom=bottom, color=c, label=part if i == 0 else None,
               hatch="//" if part == "optimizer" and m.get("where") == "host" else None)
        bottom += m[part] / 1024
    ax.plot([i - 0.4, i + 0.4], [formula / 1024] * 2, color="black", lw=2, label="formula" if i == 0 else None)
ax.set_xticks(range(len(ENGINES)), list(ENGINES)); ax.set_ylabel("KiB per rank")
ax.set_title(f"model states per rank, N = {N}, fp32 AdamW (hatched: on the host)"); ax.legend(fontsize=8)
plt.show()

for stage in (1, 2, 3):
    m = res["bf16", stage]
    padded = res[f"ZeRO-{stage}"]["padded_params"]
    print(f"bf16 ZeRO-{stage}: measured {m['params'] + m['grads'] + m['optimizer']:,} B = "
          f"(2+2+12) formula {model_state_bytes(padded, N, stage):,.0f} B")
    assert m["params"] + m["grads"] + m["optimizer"] == model_state_bytes(padded, N, stage)

# %% [markdown]
# ## Communication per stage
# Bytes each rank puts on the wire per step, from the trace. Stages 1 and 2 move the same bytes as
# DDP (the all-reduce is split into its two halves); stage 3 adds a second all-gather: 3Ψ vs 2Ψ.

# %%
fig, ax = plt.subplots(figsize=(7, 2.8))
for i, name in enumerate(ENGINES):
    bottom = 0
    for op, b in sorted(res[name]["wire"].items()):
        ax.bar(i, b / 1024, bottom=bottom, color=COLORS[op], label=op if op not in ax.get_legend_handles_labels()[1] else None)
        bottom += b / 1024
ax.set_xticks(range(len(ENGINES)), list(ENGINES)); ax.set_ylabel("KiB on the wire per rank per step")
ax.set_title(f"communication per stage, N = {N}, from the trace"); ax.legend(fontsize=8); plt.show()
ddp = sum(res["DDP"]["wire"].values())
for name in ENGINES:
    print(f"{name:>17}: {sum(res[name]['wire'].values()) / ddp:.4f} x DDP")
ratio = sum(res["ZeRO-3"]["wire"].values()) / ddp
assert abs(ratio / 1.5 - 1) < 0.02 and abs(sum(res["ZeRO-1"]["wire"].values()) / ddp - 1) < 0.02

# %% [markdown]
# ## ZeRO-3 on a timeline: gather, compute, free, prefetch
# Two ranks, one traced step. Compute spans are per unit (F0 = forward of the embeddings, F1 and
# F2 the blocks, F3 the head; B3…B0 backward). Each unit's all-gather is issued while the unit
# before it computes (prefetch), and each reduce-scatter runs while the next unit's backward
# computes. Each rank's row has one lane per kind of event (compute, all-gather, reduce-scatter), so
# the two kinds of communication, which overlap each other, never hide one another. Below: the bytes
# of full parameters alive on rank 0. Never more than two units.

# %%
def zero3_step():
    torch.manual_seed(0)
    z = ZeRO(GPT(CFG, 0), stage=3)
    train_steps(z, z.step, CFG, steps=1, batch_size=8, spans=False)  # warm-up
    trace.reset()
    z.gathered_log.clear()
    train_steps(z, z.step, CFG, steps=1, batch_size=8, spans=False)
    return trace.events(), z.gathered_log, max(u.padded for u in z.units) * 4


per_rank = minipar.launch(zero3_step, 2)
t0 = min(e.start for evs, _, _ in per_rank for e in evs)
evs = trace.merge([evs for evs, _, _ in per_rank])
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 4), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
plot_timeline(evs, ax=ax1, title="ZeRO-3, one step on 2 ranks")
log = per_rank[0][1]
ax2.step([(t - t0) * 1e3 for t, _ in log], [b / 1024 for _, b in log], where="post", color=COLORS["all_gather"])
ax2.set_ylabel("gathered KiB\n(rank 0)"); ax2.set_xlabel("wall-clock time (ms)")
plt.tight_layout(); plt.show()
unit_bytes = per_rank[0][2]
gathers = [e for e in evs if e.rank == 0 and e.name == "all_gather"]
fwd = {e.name: e for e in evs if e.rank == 0 and e.name.startswith("F")}
print(f"{len(gathers)} all-gathers for {len(fwd)} units; peak gathered {max(b for _, b in log):,} B "
      f"(largest unit {unit_bytes:,} B)")
assert len(gathers) == 2 * len(fwd) and max(b for _, b in log) <= 2 * unit_bytes and log[-1][1] == 0
assert any(fwd["F1"].start < g.start < fwd["F1"].end for g in gathers)  # unit 2 prefetched during unit 1

# %% [markdown]
# ## Beside torch's FSDP2
# `torch.distributed.fsdp.fully_shard` (FSDP2) wraps the same units (each block, then the root) and
# shards them the same way. Trained from the same seed for 5 steps, it ends with the same
# parameters as our ZeRO-3. Speed and peak memory side by side: `python -m minipar.bench.dp`.

# %%
def ours_and_fsdp2(steps=5):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from minipar.dp import local_batch
    from minipar.model import SyntheticData, make_optimizer
    ours = train_zero(CFG, 3, steps=steps)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = GPT(CFG, 0)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters())
    data = SyntheticData(CFG.vocab, CFG.seq, 0)
    for step in range(steps):
        x, y = local_batch(data, step, 8)
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    return max((ours["params"][n] - p.full_tensor()).abs().max().item() for n, p in model.named_parameters())


diff = minipar.launch(ours_and_fsdp2, 2)[0]
print(f"largest parameter difference, our ZeRO-3 vs FSDP2 after 5 steps: {diff:.1e}")
assert diff < 1e-6

# %% [markdown]
# ## Offload: the optimizer on the host
# ZeRO-Offload (Ren et al. 2021) keeps the fp32 master weights and Adam's moments in host memory
# and runs the step on the CPU: the device keeps only (P + G)Ψ/N. Here both "devices" are the CPU,
# but the code is the one that copies GPU↔host on a GPU machine (`minipar.offload.ShardOptimizer`).

# %%
m = res["ZeRO-3 + offload"]["memory"]
print(f"device: params {m['params']:,} + grads {m['grads']:,} B;  {m['where']}: optimizer {m['optimizer']:,} B")
assert m["where"] == "host" and m["params"] + m["grads"] == 8 * res["ZeRO-3"]["padded_params"] // N

# %% [markdown]
# ## Mixed precision and loss scaling
# bf16 compute with fp32 master weights trains. fp16 needs loss scaling (Micikevicius et al. 2018):
# we inject an inf into rank 0's gradient at step 3; every rank agrees to skip that step, and the
# scale is halved.

# %%
def mixed():
    bf16 = train_zero(CFG, 3, steps=10, precision=MixedPrecision("bf16"))
    fp16 = train_zero(CFG, 2, steps=6, precision=MixedPrecision("fp16", loss_scale="dynamic"), inject_overflow_at=3)
    return bf16["losses"], fp16["losses"], fp16["scale_history"]


bf16_losses, fp16_losses, history = minipar.launch(mixed, 2)[0]
print("bf16 losses:", [f"{l:.3f}" for l in bf16_losses])
print("fp16 (scale, skipped) per step:", history)
assert bf16_losses[-1] < bf16_losses[0] - 0.2
assert [s for _, s in history] == [False, False, False, True, False, False] and history[4][0] == history[3][0] / 2

# %% [markdown]
# ## Calculator: memory per device
# Ψ (billions of parameters: the sizes of well-known models, the paper's 7.5B among them), N, the
# stage and K, through the same formula as above. The bars show all four stages for the chosen Ψ, N
# and K; the chosen stage is outlined.

# %%
SIZES = [0.125, 0.35, 1.3, 1.5, 7, 7.5, 13, 30, 65, 70, 175, 405, 671, 1000]
STAGES = [("0 · DDP / NO_SHARD", 0), ("1 · P_os", 1), ("2 · SHARD_GRAD_OP", 2), ("3 · FULL_SHARD", 3)]


def calculator(psi, n, stage, k):
    """Model states per device for Ψ = psi billion parameters on n ranks (16-bit P and G)."""
    gb = [model_state_bytes(psi * 1e9, n, s, k=k) / 1e9 for s in range(4)]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    bars = ax.bar([f"stage {s}" for s in range(4)], gb, color=[COLORS["F"], COLORS["B"], COLORS["W"], COLORS["all_gather"]])
    bars[stage].set(edgecolor="black", linewidth=2.5)
    ax.bar_label(bars, [f"{g:.4g} GB" for g in gb], fontsize=8)
    ax.set_yscale("log"); ax.set_ylim(min(gb) / 3, max(gb) * 3)
    ax.set_ylabel("GB per device"); ax.set_title(f"Ψ = {psi:g}B, N = {n}, K = {k}")
    text = f"Ψ = {psi:g}B, N = {n}, stage {stage}, K = {k}: {gb[stage]:.4g} GB of model states per device"
    return text, fig, gb[stage]


gb = explorer(calculator, {
    "psi": widgets.SelectionSlider(options=SIZES, value=7.5, description="Ψ (B)"),
    "n": widgets.SelectionSlider(options=[2 ** i for i in range(11)], value=64, description="N"),
    "stage": widgets.Dropdown(options=STAGES, value=3, description="stage"),
    "k": widgets.IntSlider(value=12, min=0, max=16, description="K (bytes)")}, per_row=2)
assert gb == model_state_bytes(7.5e9, 64, 3) / 1e9 == 1.875   # the paper's Ψ = 7.5B on 64 GPUs, ZeRO-3

# %% [markdown]
# ## Exercise: your own ZeRO-2 gradient shard
# Write `shard_gradient(flat_grad)`: it receives this rank's full flat gradient, whose length need
# not divide by N. Return this rank's shard of the **average** over ranks: pad with zeros to a
# multiple of N, reduce-scatter, and keep ⌈numel/N⌉ elements. The checker runs it on 2, 3 and 4 ranks
# and on randomized sizes.

# %%
from minipar.exercises import check


# %% tags=["exercise"]
def shard_gradient(flat_grad):
    """This rank's shard of the average of every rank's flat gradient (padded to a multiple of N)."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("zero_shard", shard_gradient)
print(verdict)
assert verdict  # solution-only
