# %% [markdown]
# # 10 · Memory techniques: recompute, mixed precision, FP8, accumulation, offload
#
# **The idea.** A GPU's memory during training holds two things: the **model states** (parameters,
# gradients, optimizer state) and the **activations** kept for backward. With Ψ parameters, 16-bit
# compute and Adam with fp32 master weights, the model states alone are
#
# $$(P + G + K)\,\Psi = (2 + 2 + 12)\,\Psi = 16\Psi \text{ bytes}$$
#
# (Rajbhandari et al. 2020, *ZeRO*, Sec. 3), and a transformer layer keeps
# $sbh\,(34 + 5as/h)$ bytes of activations (Korthikanti et al. 2022, Sec. 4). Every technique here
# trades something for one of those terms:
#
# | technique | shrinks | costs | source |
# |---|---|---|---|
# | activation recompute, full / selective | activations | an extra forward / the attention core again | Chen et al. 2016; Korthikanti et al. 2022 |
# | mixed precision (bf16/fp16 + fp32 masters) | P, G and activations: 2 bytes | loss scaling for fp16 | Micikevicius et al. 2018 |
# | FP8 with per-tensor scaling | GEMM operands: 1 byte | a scale per tensor, an amax history | Micikevicius et al. 2022 |
# | gradient accumulation | activations (per micro-batch) | more, smaller steps | — |
# | ZeRO-1/2/3 | K, G, P: divided by N | communication | Rajbhandari et al. 2020 |
# | CPU offload | K on the host | host↔device copies | Ren et al. 2021 |
# | NVMe offload | K (and the fp32 gradient) in files on disk | disk reads and writes every step | Rajbhandari et al. 2021 |
#
# We measure each one on a live run, then climb down **the memory ladder** of one model from 16Ψ.
# Bytes are per rank, counted on the tensors a rank really holds.

# %%
import inspect
import os
import tempfile
import time

import matplotlib.pyplot as plt
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

import minipar
from minipar import fp8
from minipar.activations import SavedActivations
from minipar.dp import DDP, held_bytes, local_batch
from minipar.model import GPT, GPTConfig, SyntheticData, train_reference
from minipar.offload import NVMeOptimizer, ShardOptimizer
from minipar.plan import activation_bytes_per_layer, hardware_flops, model_state_bytes
from minipar.precision import MixedPrecision
from minipar.recompute import apply_recompute
from minipar.timeline import COLORS
from minipar.zero import check_offload, gpt_units, nvme_bytes, train_zero

CFG = GPTConfig(vocab=64, seq=64, layers=2, heads=4, hidden=64)
B = 4
PSI = sum(p.numel() for p in GPT(CFG).parameters())
print(f"Ψ = {PSI:,} parameters; s = {CFG.seq}, b = {B}, h = {CFG.hidden}, a = {CFG.heads}, l = {CFG.layers}")

# %% [markdown]
# ## 1 · Activation recompute: full vs selective
# **Full** recompute (Chen et al. 2016) keeps only each block's input and reruns the whole block in
# backward: one more forward pass, +33% FLOPs for the layers. **Selective** recompute (Korthikanti
# et al. 2022, Sec. 5) reruns only the attention core softmax(QKᵀ)V, which owns the $5as^2b$ term
# (the s×s scores and softmax) but few FLOPs. `minipar.recompute` wraps either part in torch's
# non-reentrant `checkpoint`:

# %%
print(inspect.getsource(minipar.recompute.apply_recompute))

# %% [markdown]
# The reference model calls the fused `scaled_dot_product_attention`, which (like FlashAttention)
# never stores the s×s scores: it has no $as^2b$ term for selective recompute to remove (notebook 01
# shows this). To see the term the paper measured, we plug in the unfused attention that
# Megatron-LM ran in 2022. Memory: `SavedActivations` adds up the storages autograd saves for backward.
# FLOPs: torch's `FlopCounterMode` counts every matmul that runs, the recomputed ones included.

# %%
def unfused_attention(q, k, v):
    """softmax(QKᵀ/√d)V with the s×s scores materialized (what selective recompute targets)."""
    s = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1) @ v


def unfused(model):
    for blk in model.blocks:
        blk.attn.attn_fn = unfused_attention
    return model


def measure_recompute(mode, early_stop=True, dtype=torch.float32, batch=B):
    model = unfused(GPT(CFG).to(dtype))
    if mode:
        apply_recompute(model, mode)
    x, y = SyntheticData(CFG.vocab, CFG.seq).batch(0, batch)
    with FlopCounterMode(display=False) as flops, set_checkpoint_early_stop(early_stop):
        with SavedActivations(model) as meter:
            _, loss = model(x, y)
        loss.backward()
    return dict(bytes=meter.bytes, flops=flops.get_total_flops(), grads=[p.grad for p in model.parameters()])


MODES = (None, "selective", "full")
rc = {m: measure_recompute(m) for m in MODES}
rc_no_early = {m: measure_recompute(m, early_stop=False) for m in MODES}
s, b, h, a, l = CFG.seq, B, CFG.hidden, CFG.heads, CFG.layers
for m in MODES:
    f = hardware_flops(l, h, CFG.vocab, s, b, m)
    print(f"{str(m):>9}: saved {rc[m]['bytes'] / 1024:7.1f} KiB | FLOPs {rc[m]['flops'] / 1e6:6.1f} M "
          f"(early stop off: {rc_no_early[m]['flops'] / 1e6:6.1f} M; formula {f / 1e6:6.1f} M)")
    assert all(torch.equal(g, g0) for g, g0 in zip(rc[m]["grads"], rc[None]["grads"]))  # recompute is exact
    assert rc_no_early[m]["flops"] == round(f)  # the formula counts every recomputed matmul

# %% [markdown]
# **Against the formulas.**
# * FLOPs: with nothing recomputed the count equals `plan.hardware_flops` exactly (72Bslh²(1 + s/6h) + 6BshV,
#   Narayanan et al. 2021). With torch's *early stop* turned off, recompute adds exactly the formula's
#   extra: 4Bs²h per layer for selective (QKᵀ and softmax·V) and one whole forward of the blocks for full.
#   With early stop on (torch's default) the rerun halts once the last tensor backward needs has been
#   rebuilt, so the block's last matmul is never recomputed: selective saves softmax·V (2Bs²h per
#   layer), full saves the MLP's output projection (2·4bsh² per layer). Both are asserted below.
# * Memory: selective removes the s×s tensors. Without dropout, the unfused attention keeps one s×s
#   fp32 tensor per head (the softmax output, 4as²b bytes) and the causal mask (s² bytes of bool), per
#   layer. The paper's 5as²b counts the scores, the softmax output (2 bytes each) and a dropout mask (1 byte).

# %%
extra = {m: rc[m]["flops"] - rc[None]["flops"] for m in MODES}
assert extra["selective"] == 4 * b * s * s * h * l - 2 * b * s * s * h * l
assert extra["full"] == 24 * b * s * l * h * h * (1 + s / (6 * h)) - 2 * b * s * (4 * h) * h * l
s2_term = rc[None]["bytes"] - rc["selective"]["bytes"]
print(f"selective removed {s2_term:,} B = l(4as²b + s²) = {l * (4 * a * s * s * b + s * s):,} B; "
      f"extra FLOPs: selective +{extra['selective'] / rc[None]['flops']:.1%}, full +{extra['full'] / rc[None]['flops']:.1%}")
assert s2_term == l * (4 * a * s * s * b + s * s)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 2.8))
labels = ["none", "selective", "full"]
colors = [COLORS["F"], COLORS["recompute"], COLORS["B"]]
ax1.bar(labels, [rc[m]["bytes"] / 1024 for m in MODES], color=colors)
ax1.set_ylabel("KiB saved for backward"); ax1.set_title("activation memory (measured)")
ax2.bar(labels, [rc[m]["flops"] / 1e6 for m in MODES], color=colors, label="measured")
ax2.scatter(labels, [hardware_flops(l, h, CFG.vocab, s, b, m) / 1e6 for m in MODES], color="black", zorder=3,
            label="formula (no early stop)")
ax2.set_ylabel("MFLOP per step"); ax2.set_title("FLOPs forward + backward"); ax2.legend(fontsize=8)
fig.suptitle(f"recompute on one rank: s={s}, b={b}, h={h}, a={a}, l={l}, fp32"); fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · Mixed precision: 16-bit compute, fp32 master weights, loss scaling
# Micikevicius et al. 2018 give three rules, and `minipar.precision` follows them:
# 1. **Master weights.** The optimizer updates an fp32 copy. An update lr·Δ smaller than half a
#    16-bit ulp of the weight rounds away: bf16 has 8 bits of mantissa, so around 1.0 anything below
#    2⁻⁸ = 0.0039 is lost.
# 2. **Loss scaling** (fp16 only). fp16 has 5 exponent bits: values below 2⁻²⁴ ≈ 6e-8 flush to zero.
#    Multiplying the loss by S scales every gradient by S into range; unscale before the step. bf16
#    has fp32's 8 exponent bits and needs no scaling.
# 3. **fp32 accumulation** of reductions (the matmul accumulators, the loss, the norms).

# %%
w16, w32 = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0)
for _ in range(1000):
    w16 += 1e-4           # AdamW's typical step size, applied to the 16-bit weight itself
    w32 += 1e-4           # ... and to the fp32 master
print(f"1000 updates of 1e-4: bf16 weight {w16.item():.4f}, fp32 master {w32.item():.4f}")
assert w16.item() == 1.0 and abs(w32.item() - 1.1) < 1e-3

g = torch.tensor([1e-8, 3e-6])
S = 2.0**16
print(f"gradients {g.tolist()} in fp16: {g.half().tolist()}; scaled by S = 2^16 then unscaled in fp32: "
      f"{((g * S).half().float() / S).tolist()}")
assert g.half()[0] == 0 and ((g * S).half().float() / S)[0] > 0

# %% [markdown]
# Dynamic loss scaling on 2 ranks: start at S = 2¹⁶; if any gradient on any rank is inf/NaN, every
# rank skips the step and halves S (here we put an inf into rank 0's gradient at step 3; any real
# overflow of fp16's range at a too-large S is skipped the same way).
# Beside it, bf16 and fp32 training from the same seed: 16-bit compute follows the fp32 curve.

# %%
print(inspect.getsource(minipar.precision.DynamicLossScaler.unscale_))


def precision_runs():
    fp32 = train_zero(CFG, 2, steps=8, batch_size=8)
    bf16 = train_zero(CFG, 2, steps=8, batch_size=8, precision=MixedPrecision("bf16"))
    fp16 = train_zero(CFG, 2, steps=8, batch_size=8, precision=MixedPrecision("fp16", loss_scale="dynamic"),
                      inject_overflow_at=3)
    return fp32, bf16, fp16


fp32_run, bf16_run, fp16_run = minipar.launch(precision_runs, 2)[0]
hist = fp16_run["scale_history"]
print("fp16 loss scale per step:", [f"2^{int(torch.tensor(sc).log2())}" + (" (skipped)" if bad else "") for sc, bad in hist])
print("losses fp32:", [round(x, 3) for x in fp32_run["losses"]])
print("losses bf16:", [round(x, 3) for x in bf16_run["losses"]])
assert hist[3][1]  # the injected inf was caught on every rank
for (sc, bad), (nxt, _) in zip(hist, hist[1:]):
    assert nxt == (sc / 2 if bad else sc)  # an overflow halves S; growth would need 1000 clean steps
assert abs(bf16_run["losses"][-1] - fp32_run["losses"][-1]) < 0.05 * fp32_run["losses"][-1]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 2.8))
ax1.plot(fp32_run["losses"], color=COLORS["F"], label="fp32")
ax1.plot(bf16_run["losses"], "--", color=COLORS["B"], label="bf16 + fp32 masters")
ax1.plot(fp16_run["losses"], ":", color=COLORS["all_reduce"], label="fp16 + loss scaling")
ax1.set_xlabel("step"); ax1.set_ylabel("loss (nats)"); ax1.set_title("ZeRO-2 on 2 ranks"); ax1.legend(fontsize=8)
ax2.step(range(len(hist)), [sc for sc, _ in hist], where="post", color=COLORS["all_reduce"])
ax2.scatter([i for i, (_, bad) in enumerate(hist) if bad], [sc for sc, bad in hist if bad], color="black",
            zorder=3, label="overflow: step skipped")
ax2.set_yscale("log", base=2); ax2.set_xlabel("step"); ax2.set_ylabel("loss scale S")
ax2.set_title("dynamic loss scale (fp16)"); ax2.legend(fontsize=8)
fig.tight_layout(); plt.show()

# %% [markdown]
# Read the fp16 curve with the scale beside it: every skipped step is a step the model did not take,
# so the fp16 loss lags the others by the skipped steps. Besides the injected inf, fp16's range itself
# overflowed once in this run, at step 2 with S = 2¹⁶ (the loss scaled by 65536 pushes some gradients past
# fp16's 65504; the same run without the injected inf skips that step too); the
# scaler found it, skipped the step and halved S, as designed.

# %% [markdown]
# ## 3 · FP8 with per-tensor scaling
# FP8 halves 16-bit's bytes again, but its range is tiny: E4M3 (weights, activations) reaches 448,
# E5M2 (gradients) 57344, and their smallest subnormals are 2⁻⁹ and 2⁻¹⁶. Micikevicius et al. 2022
# scale **each tensor**: $x_8 = \mathrm{fp8}(\mathrm{clamp}(x\cdot s))$ with $s = \max/\mathrm{amax}$.
# *Delayed* scaling (Transformer Engine's default) takes amax from a history of past steps, so the
# cast needs no extra pass over the tensor; *current* scaling uses the tensor's own amax.
# `minipar.fp8` simulates it on CPU with the real casts to `torch.float8_e4m3fn`/`float8_e5m2`
# (the GEMM then runs on the dequantized values: FP8's numbers, not its speed).

# %%
print(inspect.getsource(fp8.ScaleTracker.next_scale))
print(inspect.getsource(fp8.FP8Linear.forward))

# %% [markdown]
# Training the same model from the same seed in fp32, bf16 and FP8 (the blocks' linears through
# FP8, the rest in bf16, the fp32 masters unchanged), plus FP8 *without* scaling (s = 1), which
# shows what the scale buys: most gradient elements (amax ~1e-5) fall below E5M2's smallest
# subnormal, 2⁻¹⁶ ≈ 1.5e-5, and become 0. (On this small model AdamW, which normalizes each
# gradient by its running RMS, still makes progress on the survivors; the lost elements are the
# measurement to read.)

# %%
FP8_CFG = CFG.replace(seq=32)
t0 = time.perf_counter()
runs = {"fp32": fp8.train_precision(FP8_CFG, "fp32", steps=20),
        "bf16": fp8.train_precision(FP8_CFG, "bf16", steps=20),
        "fp8 delayed": fp8.train_precision(FP8_CFG, "fp8", steps=20, recipe="delayed"),
        "fp8 current": fp8.train_precision(FP8_CFG, "fp8", steps=20, recipe="current"),
        "fp8 unscaled": fp8.train_precision(FP8_CFG, "fp8", steps=20, recipe="none")}


def underflow(run):  # fraction of nonzero output-gradient elements that the E5M2 cast turned into 0
    ts = run["trackers"].values()
    return sum(t.grad_scale.underflowed for t in ts) / sum(t.grad_scale.elements for t in ts)


for name, r in runs.items():
    print(f"{name:>12}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
          + (f"; gradient elements flushed to 0: {underflow(r):.1%}" if r["trackers"] else ""))
print(f"({time.perf_counter() - t0:.1f} s)")
final = {k: r["losses"][-1] for k, r in runs.items()}
assert abs(final["fp8 delayed"] - final["bf16"]) < 0.02 * final["bf16"]
assert abs(final["fp8 current"] - final["bf16"]) < 0.02 * final["bf16"]
assert underflow(runs["fp8 unscaled"]) > 0.2 and underflow(runs["fp8 delayed"]) < 0.01

delayed = runs["fp8 delayed"]["trackers"]
SHOW = max(delayed, key=lambda n: len(set(delayed[n].grad_scale.scales)))  # the linear whose scale moves most
lin, cur = delayed[SHOW], runs["fp8 current"]["trackers"][SHOW]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.9))
for name, c, st in (("fp32", COLORS["F"], "-"), ("bf16", COLORS["B"], "--"), ("fp8 delayed", COLORS["W"], "-"),
                    ("fp8 current", COLORS["recompute"], ":"), ("fp8 unscaled", COLORS["all_reduce"], "-")):
    ax1.plot(runs[name]["losses"], st, color=c, label=name)
ax1.set_xlabel("step"); ax1.set_ylabel("loss (nats)"); ax1.set_title("FP8 beside bf16 and fp32"); ax1.legend(fontsize=8)
ax2.plot(lin.grad_scale.scales, color=COLORS["W"], label="output gradient (E5M2), delayed")
ax2.plot(cur.grad_scale.scales, ":", color=COLORS["recompute"], label="output gradient (E5M2), current")
ax2.plot(lin.input_scale.scales, color=COLORS["F"], label="input (E4M3), delayed")
ax2.set_yscale("log", base=2); ax2.set_xlabel("step"); ax2.set_ylabel("scale s")
ax2.set_title(f"{SHOW}: the scale's history"); ax2.legend(fontsize=7)
fig.tight_layout(); plt.show()
sat = {n: t.grad_scale.saturated for n, t in runs["fp8 delayed"]["trackers"].items()}
print(f"gradient elements saturated by delayed scaling (an amax above the history's max), per linear: {sat}")
print(f"with current scaling: {sum(t.grad_scale.saturated for t in runs['fp8 current']['trackers'].values())}")
assert sum(t.grad_scale.saturated for t in runs["fp8 current"]["trackers"].values()) == 0

# %% [markdown]
# The price of delayed scaling is visible: when a gradient's amax grows faster than its history, a
# few elements saturate at ±57344/s before the history catches up. Current scaling never saturates,
# at the cost of a max-reduction over each tensor before its cast. The gradient scales fall by
# powers of two as training warms up: the loss's gradients grow from ~1e-5.

# %% [markdown]
# ## 4 · Gradient accumulation
# k micro-batches of B/k, gradients summed before one step: the same update as batch B (up to
# rounding), while the activations in memory are those of **one** micro-batch, 1/k of the batch's.

# %%
ref1 = train_reference(CFG, steps=3, batch_size=8)
ref4 = train_reference(CFG, steps=3, batch_size=8, grad_accum=4)
err = max((p - q).abs().max().item() for p, q in zip(ref1.model.parameters(), ref4.model.parameters()))
act_full, act_micro = measure_recompute(None, batch=8)["bytes"], measure_recompute(None, batch=2)["bytes"]
print(f"batch 8 in one pass vs 4 micro-batches of 2: max parameter difference {err:.1e}; activations "
      f"{act_full / 1024:.0f} KiB vs {act_micro / 1024:.0f} KiB per micro-batch ({act_full / act_micro:.2f}x)")
assert err < 1e-5 and abs(act_full / act_micro - 4) < 0.05

# %% [markdown]
# ## 5 · The memory ladder, from 16Ψ down
# One model, N = 4 data-parallel ranks, bf16 compute with fp32 master weights and AdamW, each rung a
# live run whose held bytes are compared with `plan.model_state_bytes` (ZeRO 2020, Sec. 5):
#
# | rung | params | grads | optimizer (K = 12) | formula |
# |---|---|---|---|---|
# | DDP | 2Ψ | 2Ψ | 12Ψ | 16Ψ |
# | ZeRO-1 | 2Ψ | 2Ψ | 12Ψ/N | 4Ψ + 12Ψ/N |
# | ZeRO-2 | 2Ψ | 2Ψ/N | 12Ψ/N | 2Ψ + 14Ψ/N |
# | ZeRO-3 | 2Ψ/N | 2Ψ/N | 12Ψ/N | 16Ψ/N |
# | ZeRO-3 + offload | 2Ψ/N | 2Ψ/N | on the host | 4Ψ/N on the device |
# | ZeRO-3 + NVMe | 2Ψ/N | 2Ψ/N | in files on disk | 4Ψ/N on the device |
#
# **Offload** (Ren et al. 2021, ZeRO-Offload) keeps the fp32 masters and Adam's moments on the host;
# per step the gradient shard goes device→host (2Ψ/N bytes) and the updated bf16 shard comes back
# (2Ψ/N). On this laptop host and device are the same memory, but the code is the one that copies
# GPU↔host on a GPU machine.
#
# **NVMe offload** (Rajbhandari et al. 2021, ZeRO-Infinity) goes one level further down: the host
# holds only the unit being stepped and the next one, and the optimizer states live in files on the
# NVMe disk, memory-mapped. Sec. 4.1 of the paper counts what a step must move: every optimizer
# state is read and written once, the fp32 master, the gradient and Adam's two moments, 16 bytes
# per parameter each way, **16Ψ/N read and 16Ψ/N written per rank and step**. While one unit steps
# on the CPU, an I/O thread reads the next (the prefetch), so the disk and the CPU work at once.
#
# The DDP rung is composed from `minipar.dp.DDP` and the same
# `ShardOptimizer` over the whole (unsharded) bf16 model. The ZeRO formulas are evaluated at the
# padded Ψ' (each unit rounded up to a multiple of N).

# %%
print(inspect.getsource(ShardOptimizer.__init__))
print(inspect.getsource(NVMeOptimizer.step))
N = 4
NVME_DIR = tempfile.mkdtemp(prefix="minipar-nvme-")   # on a GPU machine: a directory on the NVMe disk
check_offload("nvme", NVME_DIR, nvme_bytes(gpt_units(GPT(CFG)), N))   # writable, with room for 16Ψ': before launching


def ddp_bf16_states(steps=2):
    """DDP in bf16 with fp32 master weights; the bytes held before the last step (Adam's moments exist)."""
    model = GPT(CFG).to(torch.bfloat16)
    ddp = DDP(model)
    opt = ShardOptimizer([p.detach() for p in model.parameters()])  # fp32 masters + moments: K = 12
    data = SyntheticData(CFG.vocab, CFG.seq)
    for step in range(steps):
        x, y = local_batch(data, step, 8)
        ddp.zero_grad()
        ddp(x, y)[1].backward()
        mem = dict(params=held_bytes(model.parameters()), grads=held_bytes(b.buffer for b in ddp.buckets),
                   **opt.state_bytes())
        opt.step([p.grad for p in model.parameters()])
    return mem


def ladder():
    bf16 = MixedPrecision("bf16")
    out = {"DDP": dict(memory=ddp_bf16_states(), padded_params=PSI)}
    for name, kw in (("ZeRO-1", dict(stage=1)), ("ZeRO-2", dict(stage=2)), ("ZeRO-3", dict(stage=3)),
                     ("ZeRO-3 + offload", dict(stage=3, offload=True)),
                     ("ZeRO-3 + NVMe", dict(stage=3, offload="nvme", nvme_dir=NVME_DIR))):
        out[name] = train_zero(CFG, steps=2, batch_size=8, precision=bf16, **kw)
    return out


rungs = minipar.launch(ladder, N)[0]
STAGE = {"DDP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3, "ZeRO-3 + offload": 3, "ZeRO-3 + NVMe": 3}
device_bytes = {}
for name, r in rungs.items():
    m, pp = r["memory"], r["padded_params"]
    offload = m.get("where") in ("host", "nvme")
    formula = model_state_bytes(pp, N, STAGE[name], k=0 if offload else 12)  # offload: K leaves the device
    device_bytes[name] = m["params"] + m["grads"] + (0 if offload else m["optimizer"])
    print(f"{name:>17}: params {m['params']:>8,} + grads {m['grads']:>8,} + optimizer {m['optimizer']:>9,}"
          f"{' (' + m['where'] + ')' if offload else ''} -> device {device_bytes[name]:>9,} B = {device_bytes[name] / pp:5.2f} Ψ'; "
          f"formula {formula:>11,.0f} B")
    assert device_bytes[name] == formula
    if offload:
        assert m["optimizer"] == 12 * pp / N  # the masters and moments left the device, all of them
assert device_bytes["DDP"] == 16 * PSI
nv = rungs["ZeRO-3 + NVMe"]
shard = nv["padded_params"] // N
print(f"NVMe rung: files {nv['memory']['nvme']:,} B = 16Ψ'/N; host buffers {nv['memory']['host']:,} B "
      f"(two units in flight, of {16 * shard:,} B of states); per step read/written {nv['io'][-1]}, "
      f"formula 16Ψ'/N = {16 * shard:,} B each way")
assert nv["memory"]["nvme"] == 16 * shard and nv["memory"]["host"] < 16 * shard
assert all(step == dict(read=16 * shard, written=16 * shard) for step in nv["io"])
assert nv["losses"] == rungs["ZeRO-3 + offload"]["losses"]   # the same AdamW on the same values: same bits
assert not os.listdir(NVME_DIR)       # the files were unlinked once mapped: nothing stays behind a run

# %% [markdown]
# On the device the two offload rungs look the same: what NVMe changes is the *host*. CPU offload keeps
# all of K·Ψ/N = 12Ψ/N in host memory; NVMe keeps two units' states (the one stepping and the one
# being read), 2 × 16 bytes per parameter of the largest unit, whatever the depth. With this
# two-block model that is most of the model; with more blocks it is a shrinking fraction. Measured on
# the optimizers alone (one step on zero gradients, no ranks needed), for growing depth:

# %%
def host_and_disk(layers):
    """(host bytes with CPU offload, host bytes with NVMe, disk bytes with NVMe) of one rank of N."""
    units = gpt_units(GPT(CFG.replace(layers=layers)))
    shards = [torch.zeros(-(-sum(p.numel() for m in ms for p in m.parameters()) // N), dtype=torch.bfloat16)
              for _, ms in units]
    cpu, nvme = ShardOptimizer([s.clone() for s in shards], offload=True), NVMeOptimizer([s.clone() for s in shards], NVME_DIR)
    for opt in (cpu, nvme):
        opt.step([torch.zeros_like(s) for s in shards])
    out = cpu.state_bytes()["optimizer"], nvme.state_bytes()["host"], nvme.state_bytes()["nvme"]
    nvme.close()
    return out


DEPTHS = (2, 8, 32)
hd = {L: host_and_disk(L) for L in DEPTHS}
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(DEPTHS, [hd[L][0] / 1024 for L in DEPTHS], "o-", color=COLORS["opt"], label="host, CPU offload (12Ψ/N)")
ax.plot(DEPTHS, [hd[L][1] / 1024 for L in DEPTHS], "o-", color=COLORS["F"], label="host, NVMe (two units)")
ax.plot(DEPTHS, [hd[L][2] / 1024 for L in DEPTHS], "o--", color=COLORS["recompute"], label="disk, NVMe (16Ψ/N)")
ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("layers"); ax.set_ylabel("KiB per rank")
ax.set_title(f"where the optimizer lives, N = {N}, h = {CFG.hidden}"); ax.legend(fontsize=8); fig.tight_layout()
for L in DEPTHS:
    print(f"{L:>2} layers: host {hd[L][0]:>10,} B with CPU offload, {hd[L][1]:>8,} B with NVMe; disk {hd[L][2]:>10,} B")
assert hd[8][1] < hd[8][0] and hd[32][1] < hd[32][0] / 10      # NVMe's host memory stops growing with depth
assert hd[8][1] == hd[32][1]

# %% [markdown]
# The last rungs are activations: the model states are down to 4Ψ/N, and what remains is what
# backward needs. Measured in bf16 on one rank's micro-batch (8/N = 2 sequences) with the unfused
# attention, for each recompute mode (full: plus each block's input, 2sbh bytes per layer, which the
# checkpoint keeps outside the meter's view). Korthikanti's per-layer formula is printed beside it, as a
# scale, not a match: it counts 16-bit dropout-model layers only, while the meter also sees what no
# recompute mode removes (the embedding output, the final LayerNorm, the logits and the loss), which
# is most of full recompute's floor at this size.

# %%
acts = {m: measure_recompute(m, dtype=torch.bfloat16, batch=8 // N)["bytes"] for m in MODES}
acts["full"] += 2 * CFG.seq * (8 // N) * CFG.hidden * CFG.layers
for m in MODES:
    f = CFG.layers * activation_bytes_per_layer(CFG.seq, 8 // N, CFG.hidden, CFG.heads, recompute=m)
    print(f"activations, recompute={str(m):>9}: measured {acts[m]:>8,} B; Korthikanti l·sbh(...) {f:>9,.0f} B")
assert acts["full"] < acts["selective"] < acts[None]

names = list(rungs) + ["+ selective", "+ full"]
states = [device_bytes[n] for n in rungs] + [device_bytes["ZeRO-3 + NVMe"]] * 2
act = [acts[None]] * len(rungs) + [acts["selective"], acts["full"]]
fig, ax = plt.subplots(figsize=(10, 3.2))
ax.bar(names, [x / 1024 for x in states], color=COLORS["opt"], label="model states (device)")
ax.bar(names, [x / 1024 for x in act], bottom=[x / 1024 for x in states], color=COLORS["recompute"],
       label="activations (one micro-batch)")
for i, n in enumerate(rungs):
    ax.plot([i - 0.4, i + 0.4], [model_state_bytes(rungs[n]["padded_params"], N, STAGE[n],
                                                   k=0 if "+" in n else 12) / 1024] * 2, color="black", lw=2,
            label="plan.model_state_bytes" if i == 0 else None)
ax.set_ylabel("KiB per rank"); ax.set_xlabel("rung (each includes the ones to its left)")
ax.set_title(f"the memory ladder: Ψ = {PSI:,}, N = {N}, bf16 + fp32 masters, measured"); ax.legend(fontsize=8)
plt.xticks(fontsize=8); fig.tight_layout(); plt.show()
total = [x + y for x, y in zip(states, act)]
print(f"per-rank bytes from top to bottom: {total[0]:,} -> {total[-1]:,} ({total[0] / total[-1]:.1f}x less)")

# %% [markdown]
# ## Exercise: FP8 with delayed scaling
# Write `fp8_fake_quant(x, amax_history, fmt)`: round `x` through FP8 the way delayed scaling does.
# * the scale comes from the **history**, not from `x`: $s = 2^{\lfloor \log_2(\max_{fmt}/\max(\text{history}))\rfloor}$
#   (rounded down to a power of two; s = 1 if the history's max is 0);
# * $x_q = \mathrm{fp8}(\mathrm{clamp}(x \cdot s, -\max_{fmt}, \max_{fmt})) / s$, back in x's dtype;
# * `fmt` is `"e4m3"` (`torch.float8_e4m3fn`, max 448) or `"e5m2"` (`torch.float8_e5m2`, max 57344):
#   `torch.finfo(dtype).max` gives the max.
#
# The checker compares element for element on five cases: activations, tiny gradients, outliers above
# the history, and a zero history.

# %%

from minipar.exercises import NotYet, check


# %% tags=["exercise"]
def fp8_fake_quant(x, amax_history, fmt):
    """x rounded through FP8 with delayed per-tensor scaling."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("fp8_fake_quant", fp8_fake_quant)
print(verdict)
assert verdict  # solution-only
