# %% [markdown]
# # 08 · 3D, 4D, 5D: composing every strategy on one mesh
#
# Real training runs stack the strategies of the earlier notebooks:
#
# | recipe | axes | source |
# |---|---|---|
# | PTD-P | pipeline × tensor × data | Narayanan et al. 2021 (Megatron-LM) |
# | 4D | + context parallelism for long sequences | Llama 3 (Dubey et al. 2024) |
# | 5D | + expert parallelism for MoE layers | DeepSeek-V3 (2024) |
#
# minipar lays the ranks out on one mesh, **pp × dp × ep × cp × tp**, outermost first, so that
# consecutive ranks share the tp axis. Per step and micro-batch each axis moves very different
# amounts of data (Ψ parameters, t/p/c/d the axis sizes, b·s·h an activation):
#
# | axis | what crosses it | how often | volume per rank |
# |---|---|---|---|
# | tp | all-reduces of activations (or SP's all-gather + reduce-scatter) | 4 per layer per micro-batch | 4·2(t−1)/t·bsh per layer |
# | cp | K/V blocks around a ring | every layer | (c−1) KV blocks per layer |
# | ep | tokens to experts and back | 4 all-to-alls per MoE layer | ≈ tokens·k·h·(e−1)/e each |
# | dp | gradients (ZeRO-1: reduce-scatter + all-gather) | once per step | 2(d−1)/d·Ψ/(t·p) |
# | pp | one activation per boundary | 2 per micro-batch | bsh |
#
# The most frequent, largest traffic goes on the fastest links: **tp innermost** (NVLink inside a
# node), pp outermost (it can cross the slowest links). `minipar.train` builds this on any mesh and
# proves it is still the single-device model.

# %%
import contextlib
import dataclasses
import inspect
import io
import os

import matplotlib.pyplot as plt

import minipar
from minipar import plan, trace
from minipar.compose import ComposedStage, ParallelConfig, check
from minipar.mesh import Mesh, enumerate_groups
from minipar.model import train_reference
from minipar.timeline import AXIS_COLORS, plot_timeline
from minipar.train import configs, parse_args, train_rank

# %% [markdown]
# ## The mesh: which rank holds what
# Eight ranks as pp=2 × dp=2 × tp=2. Each rank holds one pipeline stage (half the layers), one
# tensor-parallel half of every weight in it, and sees one data shard of the batch.

# %%
axes = dict(pp=2, dp=2, tp=2)
mesh = Mesh(8, **axes)
print(mesh.describe())
for a in axes:
    print(f"{a} groups:", enumerate_groups(axes, a))

fig, ax = plt.subplots(figsize=(9, 2.6))
for r in range(8):
    c = mesh.coords(r)
    x, y = c["dp"] * 2 + c["tp"], c["pp"]
    ax.add_patch(plt.Rectangle((x + 0.05, -y - 0.45), 0.9, 0.9, color=["#4C72B0", "#55A868"][c["pp"]], alpha=0.85))
    ax.text(x + 0.5, -y, f"rank {r}\nlayers {2 * c['pp']}-{2 * c['pp'] + 1}\nheads {2 * c['tp']}-{2 * c['tp'] + 1}\n"
            f"batch shard {c['dp']}", ha="center", va="center", fontsize=7, color="white")
ax.set_xlim(0, 4); ax.set_ylim(-1.5, 0.5); ax.axis("off")
ax.set_title("pp × dp × tp = 2 × 2 × 2: tp pairs are neighbours (one NVLink island), pp splits the layers")
plt.tight_layout()

# %% [markdown]
# ## The composed model is the reference model, cut into pieces
# Every rank builds the full reference GPT from the seed, keeps its stage's layers, splits them for
# TP, and (with cp) swaps attention for ring attention. Here is the stage module:

# %%
print(inspect.getsource(ComposedStage.__init__))

# %% [markdown]
# ## The 8-rank run: tp2 · pp2 · dp2, ZeRO-1, 1F1B with 4 micro-batches
# Ten steps on 8 simulated ranks, compared with the single-device loop on the same seed and data.

# %%
FLAGS = ["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1", "--schedule", "1f1b", "--microbatches", "4",
         "--layers", "4", "--hidden", "64", "--heads", "4", "--seq", "32", "--vocab", "64", "--batch", "16",
         "--steps", "10"]
args = parse_args(FLAGS)
cfg, pc, run = configs(args)
results = minipar.launch(train_rank, pc.world_size, cfg, pc, run)
ref = train_reference(cfg, steps=args.steps, batch_size=args.batch)
losses = results[0]["losses"]
err = max(abs(a - b) for a, b in zip(losses, ref.losses))
print(f"max |loss - single device| over {args.steps} steps: {err:.2e}")
assert err < 1e-4

plt.figure(figsize=(5, 3))
plt.plot(ref.losses, "k-", label="single device")
plt.plot(losses, "o", color="#C44E52", label="tp2 · pp2 · dp2 (8 ranks)")
plt.xlabel("step"); plt.ylabel("loss (nats)"); plt.title("same model, same curve"); plt.legend(); plt.tight_layout()

# %% [markdown]
# ## Communication per axis, measured
# The trace of the last step, per axis, for rank 0 (logical payload bytes per step): the tp axis
# carries far more than dp and pp, which is why it sits on the fastest links.

# %%
events = results[0]["events"]
per_axis = {}
for (op, axis), s in trace.summary(events)[0].items():
    per_axis[axis] = per_axis.get(axis, 0) + s["bytes"]
print({a: f"{b:,} B" for a, b in per_axis.items()})
plt.figure(figsize=(5, 2.6))
plt.bar(list(per_axis), list(per_axis.values()), color=[AXIS_COLORS[a] for a in per_axis])
plt.ylabel("bytes per step (rank 0)"); plt.title("traffic by mesh axis"); plt.tight_layout()
assert per_axis["tp"] > per_axis["dp"] > 0 and per_axis["tp"] > per_axis["pp"] > 0

# %% [markdown]
# ## The timeline, on two clocks
# On this machine 8 ranks share the CPU cores printed below, so the wall clock mostly shows
# time-slicing. The modeled clock re-times the same events (their order and dependencies as
# recorded) as if each rank were an H100 with NVLink (`minipar.plan.retime`, the one simulator of
# `minipar.sim`): compute at the planner's matmul efficiency for the FLOPs of each action, each
# transfer at its link's latency and bandwidth.
#
# Our 64-wide model would finish each action in microseconds, all latency. To see the shape of a
# real step we re-time the recorded schedule **as if the model were 128× wider** (h = 8192) and
# each micro-batch held 64× the tokens (s = 2048): matmul FLOPs grow 128²·64, the gradients that
# dp reduces 128², the activations that tp and pp move 128·64. Communication is coloured by mesh axis.

# %%
WIDER, LONGER = 128, 64
b_micro = args.batch // (pc.dp * pc.microbatches)
fwd = plan.model_flops(cfg.layers, cfg.hidden * WIDER, cfg.vocab, cfg.seq * LONGER, b_micro) / 3 / (pc.pp * pc.tp)
grow = {"dp": WIDER**2, "tp": WIDER * LONGER, "pp": WIDER * LONGER}
wider = [dataclasses.replace(e, wire_bytes=e.wire_bytes * grow.get(e.axis, 1), bytes=e.bytes * grow.get(e.axis, 1))
         for e in events]
modeled = plan.retime(wider, gpu="h100", flops={"F": fwd, "B": 2 * fwd, "opt": 0.0})
fig, axs = plt.subplots(2, 1, figsize=(11, 8))
print(f"this machine: {os.cpu_count()} CPU cores for {pc.world_size} ranks")
plot_timeline(events, ax=axs[0], title=f"wall clock: {pc.world_size} ranks on {os.cpu_count()} CPU cores",
              color_by="axis")
plot_timeline(modeled, ax=axs[1], unit="ms", clock="modeled", color_by="axis",
              title=f"modeled clock: the same schedule, {WIDER}x wider and {LONGER}x longer, on 8 H100s")
plt.tight_layout()
assert len({e.rank for e in modeled}) == 8

# %% [markdown]
# ## Memory per rank against the calculator
# Each rank holds Ψ_local = Ψ/(t·p) parameters (a stage's share of a TP shard). ZeRO-1 over d = 2
# data-parallel ranks gives, in fp32 (4-byte parameters and gradients; AdamW's two moments,
# K = 8 bytes per parameter: in fp32 the parameter is its own master):
#
# $$ M = 4Ψ'_{local} + 4Ψ'_{local} + 8Ψ'_{local}/d $$
#
# (Rajbhandari et al. 2020, P_os; Ψ' is Ψ_local padded to a multiple of d: the flat parameter and
# gradient buffers of each unit are padded so that they split into d equal shards).

# %%
rows = []
for r, res in enumerate(results):
    sb = res["state_bytes"]
    want = plan.model_state_bytes(sb["padded"], pc.dp, 1, k=8, param_bytes=4, grad_bytes=4)
    got = sb["params"] + sb["grads"] + sb["optimizer"]
    rows.append((r, sb["numel"], got, want))
    assert got == want, (r, got, want)
print("rank  Ψ_local   measured B   formula B")
for r, n, got, want in rows:
    print(f"{r:>4} {n:>9,} {got:>12,} {want:>11,}")

# %% [markdown]
# ## FSDP + TP: ZeRO stages 0–3 beside tensor parallelism
# torchtitan's 2D layout shards parameters, gradients and optimizer state over dp (FSDP = ZeRO-3) and
# splits each layer over tp. `--zero 3` does the same here (`minipar/optim.py`, which hands stages 1-3 to
# notebook 02's `ZeRO`, one unit per embedding, block and head, and adds only the sums over the
# other axes). The same 4 ranks (dp2 · tp2, SP) at each
# stage: the loss curve stays the reference's, and the model states per rank follow ZeRO's table
# (Rajbhandari et al. 2020, Sec. 5) in fp32, with Ψ' this rank's padded TP-local parameters and d = 2:
#
# | stage | parameters | gradients | optimizer (two moments) |
# |---|---|---|---|
# | 0 | 4Ψ | 4Ψ | 8Ψ |
# | 1 | 4Ψ' | 4Ψ' | 8Ψ'/d |
# | 2 | 4Ψ' | 4Ψ'/d | 8Ψ'/d |
# | 3 | 4Ψ'/d | 4Ψ'/d | 8Ψ'/d |
#
# The same `--zero 3` composes with a pipeline too (torchtitan's 3D: `--dp 2 --pp 2 --tp 2 --zero 3` with
# gpipe, 1f1b or interleaved; tested in `tests/test_train.py`). Each unit is then gathered for every
# micro-batch's F and again for its B, so ZeRO-3's traffic grows with m, one reason Megatron pairs
# pipelines with ZeRO-1 (its distributed optimizer) instead.

# %%
table = [f"{'ZeRO':>4}{'max |loss - ref|':>18}{'params B':>11}{'grads B':>11}{'optim B':>11}{'total B':>11}"]
for stage in range(4):
    a = parse_args(["--dp", "2", "--pp", "1", "--tp", "2", "--sp", "--zero", str(stage), "--steps", "3",
                    "--layers", "4", "--hidden", "64", "--heads", "4", "--seq", "32", "--vocab", "64", "--batch", "16"])
    c, p_, r_ = configs(a)
    with contextlib.redirect_stdout(io.StringIO()):   # the ranks' progress bars
        out = minipar.launch(train_rank, p_.world_size, c, p_, r_)[0]
    r = train_reference(c, steps=3, batch_size=16).losses
    sb, n, P_, d = out["state_bytes"], out["state_bytes"]["numel"], out["state_bytes"]["padded"], 2
    want = {0: (4 * n, 4 * n, 8 * n), 1: (4 * P_, 4 * P_, 8 * P_ // d), 2: (4 * P_, 4 * P_ // d, 8 * P_ // d),
            3: (4 * P_ // d, 4 * P_ // d, 8 * P_ // d)}[stage]
    got = (sb["params"], sb["grads"], sb["optimizer"])
    err = max(abs(x - y) for x, y in zip(out["losses"], r))
    table.append(f"{stage:>4}{err:>18.1e}{got[0]:>11,}{got[1]:>11,}{got[2]:>11,}{sum(got):>11,}")
    assert got == want and err < 2e-5, (stage, got, want)
print("\n".join(table))

# %% [markdown]
# ## 5D: experts over ep, the sequence over cp, on one mesh
# DeepSeek-V3 trains an MoE model with its experts spread over 64 ranks (EP64) inside a 16-stage
# pipeline; Llama 3 adds context parallelism for long sequences. minipar composes all five axes. On
# 16 ranks as dp2 · pp2 · ep2 · cp2 (tp 1), each rank holds one pipeline stage, half the experts
# of every MoE block, and two of the four zigzag chunks of each sequence of its data shard:

# %%
axes5 = dict(pp=2, dp=2, ep=2, cp=2, tp=1)
mesh5 = Mesh(16, **axes5)
E, L5, chunks = 4, 4, 2 * axes5["cp"]
fig, ax = plt.subplots(figsize=(11, 3.2))
for r in range(16):
    c = mesh5.coords(r)
    x, y = (c["dp"] * 2 + c["ep"]) * 2 + c["cp"], c["pp"]
    experts = [e for e in range(E) if e // (E // axes5["ep"]) == c["ep"]]
    zig = [c["cp"], chunks - 1 - c["cp"]]            # zigzag: chunk i and its mirror
    ax.add_patch(plt.Rectangle((x + 0.04, -y - 0.46), 0.92, 0.92, color=["#4C72B0", "#55A868"][c["pp"]],
                               alpha=0.55 + 0.4 * c["ep"]))
    ax.text(x + 0.5, -y, f"r{r}\nlayers {2 * c['pp']}-{2 * c['pp'] + 1}\nexperts {experts}\nchunks {zig}\n"
            f"shard {c['dp'] * 2 + c['ep']}", ha="center", va="center", fontsize=6.5, color="white")
ax.set_xlim(0, 8); ax.set_ylim(-1.5, 0.5); ax.axis("off")
ax.set_title("pp × dp × ep × cp = 2 × 2 × 2 × 2: ep pairs split the experts, cp pairs the sequence, pp the layers")
plt.tight_layout()
for r in (0, 1, 2, 5):
    print(f"rank {r}: {mesh5.coords(r)}")

# %% [markdown]
# Every rank routes its own tokens (under SP, its s/t slice; under CP, its chunks) and the ep
# all-to-all carries them to their experts. Capacity and the load-balancing loss are per group of
# tokens, and cp and SP spread a group's tokens over ranks, so each MoE block sums its expert counts
# over those ranks before the aux loss (`minipar.moe.split_tokens`; Megatron-Core reduces
# tokens_per_expert over tp and cp the same way), and such a run is dropless. Eight of the sixteen
# ranks, pp2 · ep2 · cp2 with 4 experts, against the single-device model, gradient by gradient:

# %%
a5 = parse_args(["--dp", "1", "--pp", "2", "--ep", "2", "--cp", "2", "--tp", "1", "--experts", "4",
                 "--microbatches", "2", "--steps", "2", "--seed", "1", "--layers", "4", "--hidden", "32",
                 "--heads", "4", "--seq", "16", "--vocab", "32", "--batch", "8"])
c5, p5, r5 = configs(a5)
with contextlib.redirect_stdout(io.StringIO()):
    out5 = minipar.launch(train_rank, p5.world_size, c5, p5, dataclasses.replace(r5, capture=True))
grads5 = {n: g for o in out5 for n, g in o["first_grads"].items()}
ref5 = train_reference(c5, steps=1, batch_size=a5.batch, seed=1).grads
scale = max(g.abs().max().item() for g in ref5.values())   # a key bias's zero gradient is rounding at this scale
worst = max((grads5[n] - g).abs().max().item() / (g.abs().max().item() + 1e-2 * scale) for n, g in ref5.items())
err5 = max(abs(x - y) for x, y in zip(out5[0]["losses"], train_reference(c5, 2, a5.batch, 1).losses))
print(f"{len(ref5)} gradients, worst relative difference {worst:.1e}; loss difference {err5:.1e}")
assert worst < 1e-5 and err5 < 2e-5
# The full 16-rank layouts (dp2 · pp2 · ep2 · cp2, and pp2 · ep2 · cp2 · tp2 with SP) are
# tests/test_train.py::test_5d_on_16_ranks_matches_the_reference.

# %% [markdown]
# ## At scale: 70B on 64 H100s
# The same composition, planned for a Llama-2-70B-shaped model on 8 nodes of 8 H100s
# (`minipar.plan`, validated against Megatron-LM's published throughput in notebook 09).

# %%
best = plan.plan("70b", gpus=64, gpu="h100")
print(best.explain() if hasattr(best, "explain") else best)

# %% [markdown]
# The planner keeps tp within a node and uses pipeline stages across nodes with enough
# micro-batches that the bubble is small; ZeRO-1 over dp shards the optimizer state. Published
# recipes for 70B (NVIDIA's Megatron-LM examples) use tp = 4 to 8 with pp = 4 to 8; the planner's
# reasons for its choice are printed above.
#
# ## Bad layouts fail before any process starts
# Every problem at once, with how to fix it:

# %%
try:
    check(cfg.replace(heads=6, hidden=60), ParallelConfig(dp=3, pp=2, tp=4, cp=2, sp=True, microbatches=3), 16, 8)
except ValueError as e:
    print(e)

# %% [markdown]
# ## Exercise: choose a layout
# Llama-2-13B (40 layers, h = 5120, s = 4096, 4M-token batch) on 16 H100s in two nodes. Return a
# layout `dict(tp=, pp=, dp=, zero_stage=)` that fits in 80 GB per GPU and reaches at least 85% of the
# planner's best predicted MFU. The checker uses `minipar.plan.estimate`.

# %%
from minipar.exercises import NotYet
from minipar.exercises import check as check_exercise


# %% tags=["exercise"]
def pick_layout():
    """Return dict(tp, pp, dp, zero_stage) for 13B on 16 H100s."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check_exercise("nd_layout", pick_layout)
print(verdict)
assert verdict  # solution-only
