# %% [markdown]
# # 11 · Parallel inference: continuous batching, a paged KV cache, TP/PP/EP/DP serving
#
# Serving a language model has two phases. **Prefill** runs the whole prompt through the model in
# one pass (many tokens per weight read: compute-bound) and yields the first token. **Decode** then
# yields one token per sequence per step, and each step reads every weight and the sequence's whole
# KV cache for one token's worth of arithmetic: it is **memory-bound**. Serving systems (Orca, vLLM,
# TensorRT-LLM, SGLang) are built around that fact:
#
# | idea | what it does | source |
# |---|---|---|
# | iteration-level scheduling | the batch changes at every decode step: finished sequences leave, new requests join | Orca (Yu et al., OSDI 2022) |
# | paged KV cache | K/V live in fixed-size blocks; a **block table** per sequence maps position p to slot table[p // B]·B + p mod B | PagedAttention / vLLM (Kwon et al., SOSP 2023) |
# | TP for latency | each GPU reads 2Ψ/t of the weights per token, plus 2 all-reduces per layer | Pope et al. 2022; Megatron-LM |
# | PP across nodes | stages read their layers in turn: one request pays p stage times; p micro-batches keep them busy | vLLM's virtual engines |
# | EP for MoE | attention data-parallel, experts split, tokens travel by all-to-all | DeepSeek-V3 (2024) |
#
# The roofline this notebook measures against (`minipar.plan.serving`; t tp, p pp, b sequences per
# micro-batch with c cached tokens each, bf16):
#
# $$t_\text{stage} = \max\Big(\frac{2\Psi'/(tp) + b\,c\,\kappa}{\text{HBM}},\ \frac{(2\Psi' b + 4bchL)/(tp)}{\text{peak}}\Big) + 2\tfrac{L}{p}\,T_\text{all-reduce}(2bh),\qquad
# \text{ITL} = p\,t_\text{stage} + \text{hops},\qquad \kappa = 2\tfrac{L}{p}\lceil n_{kv}/t\rceil\, d\cdot 2$$
#
# with Ψ' the weights that multiply (all but the embedding table) and throughput N / ITL(N/p).

# %%
import inspect
import os
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minipar.exercises import NotYet, check
from minipar.mesh import Mesh
from minipar.model import GPT, GPTConfig
from minipar.plan import serving as S
from minipar.plan.hardware import get_gpu, get_link
from minipar.serve import (
    Frontend,
    Request,
    Scheduler,
    ServeConfig,
    StageRunner,
    make_requests,
    paged_attention,
    reference,
    serve,
    simulate,
)
from minipar.timeline import COLORS, plot_timeline

torch.set_num_threads(1)   # tiny models: one thread is fastest, and it matches the simulated ranks
print(f"this machine: {os.cpu_count()} CPU cores; every rank below is a local process on them")

# %% [markdown]
# ## Why decode is memory-bound
# First, measure. One decode step of 4 sequences through a small GPT on this CPU, under torch's FLOP
# counter (attention on its math path, so that the counter sees QKᵀ and PV as matmuls). The count
# must equal **2Ψ'·b + 4·h·L·Σc** exactly: every weight that multiplies does a multiply-add per
# token, and attention does 4h FLOPs per layer per cached token it reads.

# %%
cfg = GPTConfig(vocab=64, seq=64, layers=2, heads=4, hidden=32)
reqs = [Request(i, tuple(range(1, 11 + i)), 3) for i in range(4)]
runner = StageRunner(cfg, ServeConfig().parallel(), Mesh(pp=1, dp=1, ep=1, tp=1), seed=0, num_blocks=64,
                     block_size=4)                                 # one rank, in this process
front = Frontend(reqs, max_batch=4, num_blocks=64, block_size=4)
(step,) = front.advance(0.0)                                       # the prefill of all four
tokens = runner.sample(step, runner.forward(step, runner.embed(step, [t for r in reqs for t in r.prompt])))
(step,) = front.advance(0.0)                                       # one decode step
with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
    runner.sample(step, runner.forward(step, runner.embed(step, tokens)))
m = S.ServingModel.from_gpt(cfg)
b, ctx = len(step.works), sum(w.start + 1 for w in step.works)
formula = 2 * m.matmul_params * b + 4 * cfg.hidden * cfg.layers * ctx
weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.module.named_parameters() if "wte" not in n)
slot_bytes = sum(t[0].numel() * t.element_size() for t in (*runner.k_pools.values(), *runner.v_pools.values()))
print(f"decode step, b={b}, {ctx} cached positions: {counter.get_total_flops():,} FLOPs counted, formula {formula:,}")
read = weight_bytes + ctx * slot_bytes
print(f"bytes read: weights {weight_bytes:,} (parameter storage, fp32) + K/V {ctx} x {slot_bytes} = {read:,}; "
      f"intensity {counter.get_total_flops() / read:.2f} FLOP/B")
assert counter.get_total_flops() == formula
assert slot_bytes == 2 * cfg.layers * cfg.heads * cfg.head_dim * 4     # κ for fp32: the pool's storage per slot

# %% [markdown]
# A GPU runs at its peak only when a kernel does at least **peak / HBM** FLOPs per byte it reads
# (the ridge point: 989 TFLOP/s / 3.35 TB/s ≈ 295 on an H100). Decode's intensity is about b FLOPs
# per weight byte (2 FLOPs per bf16 weight, shared by b sequences), so at batch 1 it is ~1: the GPU
# idles 99.7% of its arithmetic. Batching helps only while the weights dominate the bytes: every
# sequence also reads its own cache, so the intensity saturates at (2Ψ' + 4chL)/(t·c·κ), FLOPs per
# token over cache bytes per token. For contexts of 4096 and more that is below the ridge: decode
# stays memory-bound at any batch. Llama 2 70B, per GPU of a TP8 layout:

# %%
h100 = get_gpu("h100")
ridge = h100.peak_flops / h100.memory_bandwidth
batches = np.unique(np.logspace(0, 12, 60, base=2).astype(int))
m70, lay8 = S.SERVING_MODELS["70b"], S.Layout(tp=8)
kappa = S.kv_bytes_per_token(m70, lay8)
fig, ax = plt.subplots(figsize=(7.5, 3.6))
for c in (128, 1024, 4096, 32768):
    steps = [S.decode_step(m70, lay8, "h100", bb, c) for bb in batches]
    I = [d["flops"] / (d["weights_bytes"] + d["kv_bytes"]) for d in steps]
    ax.loglog(batches, I, label=f"context {c}")
    limit = (2 * m70.matmul_params + 4 * c * m70.hidden * m70.layers) / 8 / (c * kappa)   # b -> infinity
    assert all(x < y < limit for x, y in zip(I, I[1:])) and (max(I) < ridge) == (c >= 4096)
ax.axhline(ridge, color="black", ls="--", lw=1, label=f"H100 ridge {ridge:.0f} FLOP/B")
ax.set(xlabel="sequences per decode step b", ylabel="FLOPs per byte read",
       title="decode's arithmetic intensity, Llama 2 70B (GQA), bf16")
ax.legend(fontsize=8)
plt.tight_layout()
d1 = S.decode_step("70b", S.Layout(tp=8), "h100", 1, 1024)
print(f"b=1, context 1024: {d1['memory'] * 1e3:.2f} ms reading bytes vs {d1['compute'] * 1e6:.1f} us of math "
      f"(memory-bound: {d1['memory_bound']})")
assert d1["memory_bound"] and d1["memory"] > 100 * d1["compute"]

# %% [markdown]
# ## The paged KV cache, drawn
# The cache of every layer is one pool of blocks; a sequence's block table lists its blocks in
# order, wherever they are. The scheduler below serves 7 requests over a 20-block pool (4 tokens per
# block). Blocks are handed out as sequences grow and return to the back of the free list when a
# sequence finishes, so after a few steps tables are scattered over the pool: no sequence needs a
# contiguous region, and at most B−1 slots per sequence are unused. Admission promises each request
# the blocks of its whole life (prompt + new tokens − 1), so nothing is ever preempted.

# %%
demo = [Request(i, tuple(range(p)), g, a) for i, (p, g, a) in
        enumerate([(6, 5, 0), (3, 9, 0), (9, 3, 0), (5, 7, 1), (2, 6, 2), (7, 4, 3), (4, 8, 5)])]
sch = Scheduler(num_blocks=20, block_size=4, max_batch=4)
for r in demo:
    sch.add(r)
for tick in range(7):
    sch.step(now=tick)
    sch.blocks.check()                                               # no block lost or owned twice
bm = sch.blocks
written = {r.id: len(r.prompt) + n - 1 for r, n in sch.running[0]}   # K/V slots written so far
written.update({s: demo[s].cache_tokens for s in sch.leaving})       # finished; blocks return next step
palette = plt.get_cmap("tab10")
fig, (a0, a1) = plt.subplots(2, 1, figsize=(10, 3.8), gridspec_kw={"height_ratios": [1, 1.4]})
owner = {blk: s for s, t in bm.tables.items() for blk in t}
for blk in range(bm.num_blocks):
    s = owner.get(blk)
    a0.add_patch(plt.Rectangle((blk, 0), 0.92, 0.9, color=palette(s) if s is not None else "#E0E0E0"))
    a0.text(blk + 0.46, 0.45, f"{blk}" + (f"\nseq {s}" if s is not None else ""), ha="center", va="center", fontsize=7)
a0.set(xlim=(0, bm.num_blocks), ylim=(0, 1), title=f"the pool: {bm.num_blocks} blocks of {bm.block_size} slots "
       f"(grey: free; {bm.available()} free and not promised)")
a0.axis("off")
for row, (s, table) in enumerate(sorted(bm.tables.items())):
    for j, blk in enumerate(table):
        filled = min(bm.block_size, written[s] - j * bm.block_size)
        a1.add_patch(plt.Rectangle((j, -row), 0.92, 0.8, color=palette(s), alpha=0.35 + 0.65 * filled / bm.block_size))
        a1.text(j + 0.46, -row + 0.4, f"→{blk}", ha="center", va="center", fontsize=8)
    a1.text(-0.2, -row + 0.4, f"seq {s} ({written[s]} tokens)", ha="right", va="center", fontsize=8)
a1.set(xlim=(-2.5, 6), ylim=(-len(bm.tables) + 0.5, 1), title="block tables: logical block j → physical block "
       "(shade: slots filled)")
a1.axis("off")
plt.tight_layout()
print("free list (front first):", list(bm.free), "| promised to running sequences:", bm.promised)
for s, table in bm.tables.items():
    assert len(table) * bm.block_size >= written[s] > (len(table) - 1) * bm.block_size   # no spare block taken

# %% [markdown]
# The scheduler's step, Orca's iteration: decode the running batch, let finished sequences leave,
# admit whoever has arrived while the batch has room and the blocks suffice
# (`minipar/serve/scheduler.py`):

# %%
print(inspect.getsource(Scheduler.step))

# %% [markdown]
# And attention through the block tables (`minipar/serve/runner.py`). Everything else in a layer is
# per token, so the step's new tokens of all sequences run as one packed [N, h] matrix (Orca's
# *selective batching*); attention alone goes sequence by sequence, writing its new K/V into its
# slots and reading all of them back:

# %%
print(inspect.getsource(paged_attention))

# %% [markdown]
# ## Continuous against static batching, on a timeline
# The same 16 requests (Poisson arrivals, 20 per second; prompts of 32-512 tokens; 8-256 new tokens)
# served by the same scheduler with two policies, on the **modeled clock**: every step lasts what the
# roofline says it costs for Llama 2 70B on 8 H100s with TP8 (`plan.serving.step_cost`), and
# `serve.simulate` runs the scheduler the ranks run. *Static* (request-level) batching admits only
# into an empty batch, so newcomers wait for the longest request of the current batch; *continuous*
# batching admits at every step.

# %%
trace_reqs = make_requests(16, 32000, "32:512", "8:256", arrival_rate=20.0, seed=0)
cost = S.step_cost("70b", S.Layout(tp=8), "h100")
runs = {p: simulate(trace_reqs, cost, max_batch=8, num_blocks=4096, block_size=16, policy=p)
        for p in ("static", "continuous")}
fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
for ax, (policy, run) in zip(axes, runs.items()):
    plot_timeline(run.events, ax=ax, unit="s", clock="modeled", legend=False, label=False)
    ax.set_yticks(range(len(trace_reqs)), [f"request {r.id}" for r in trace_reqs], fontsize=7)
    s = run.summary()
    ax.set_title(f"{policy} batching: {s['throughput']:,.0f} tokens/s, TTFT p50 {s['ttft_p50']:.2f} s")
axes[0].set_xlim(0, 1.01 * max(e.end for run in runs.values() for e in run.events))
axes[0].legend(handles=[Patch(color=COLORS[k], label=v) for k, v in
                        (("opt", "waiting"), ("B", "prefill"), ("F", "decoding"))], loc="upper right", fontsize=8)
plt.tight_layout()
st, ct = runs["static"].summary(), runs["continuous"].summary()
print(f"continuous / static throughput on the modeled clock: {ct['throughput'] / st['throughput']:.2f}x; "
      f"TTFT p99 {st['ttft_p99']:.2f} s -> {ct['ttft_p99']:.2f} s")
assert ct["throughput"] > st["throughput"] and ct["ttft_p99"] < st["ttft_p99"]

# %% [markdown]
# Continuous batching's price shows in the inter-token latency: a step that also runs a newcomer's
# prefill takes longer, so running sequences see a slower token now and then (the p99 below).
# Chunked prefill (Sarathi-Serve, Agrawal et al. 2024) splits long prompts across steps to
# bound that.

# %%
print(f"ITL p50 / p99: static {st['itl_p50'] * 1e3:.1f} / {st['itl_p99'] * 1e3:.1f} ms, "
      f"continuous {ct['itl_p50'] * 1e3:.1f} / {ct['itl_p99'] * 1e3:.1f} ms")

# %% [markdown]
# ## TP, PP, EP and DP decoding: token for token `GPT.generate`
# Now the real thing, on simulated ranks: `serve()` builds the mesh, cuts the reference GPT for this
# rank (its pipeline stage, split over tp, its experts under ep: the same `ComposedStage` training
# uses), and runs the scheduler in lockstep on every rank. Ten requests with mixed lengths arrive as
# a Poisson process and are served with at most 3 sequences per step, so requests join running
# batches. Every request's tokens must equal single-device greedy decoding. (A near-tie between the
# two best logits could flip an argmax under fp32 rounding, ~1e-7 here; `reference` also returns
# the smallest top-2 gap, and we check it is far above that.)

# %%
dense = GPTConfig(vocab=64, seq=32, layers=4, heads=4, hidden=32)
moe = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2)
rows, refs = [], {}
for label, model_cfg, sc in [("TP2", dense, ServeConfig(tp=2)), ("PP2", dense, ServeConfig(pp=2)),
                             ("TP2·PP2", dense, ServeConfig(tp=2, pp=2)), ("EP2 (MoE)", moe, ServeConfig(ep=2)),
                             ("DP2", dense, ServeConfig(dp=2))]:
    reqs = make_requests(10, model_cfg.vocab, "2:10", "1:10", arrival_rate=300.0, seed=3)
    if model_cfg not in refs:
        refs[model_cfg] = [reference(GPT(model_cfg, 0), r) for r in reqs]     # (tokens, smallest top-2 gap)
    res = serve(model_cfg, reqs, replace(sc, max_batch=3))
    same = sum(rec.tokens == tok for rec, (tok, _) in zip(res.records, refs[model_cfg]))
    joined = sum(0 < e.meta.get("prefills", 0) < e.meta.get("seqs", 0) for e in res.events if e.rank == 0)
    gap = min(g for _, g in refs[model_cfg])
    rows.append((label, sc.world_size, same, len(reqs), joined, gap))
    assert same == len(reqs) and gap > 1e-5
    if label == "TP2·PP2":
        tp_pp = res
print(f"{'layout':<10}{'ranks':>6}{'identical':>11}{'steps where requests joined':>29}{'smallest top-2 gap':>20}")
for label, n, same, total, joined, gap in rows:
    print(f"{label:<10}{n:>6}{f'{same}/{total}':>11}{joined:>29}{gap:>20.1e}")

# %% [markdown]
# The TP2·PP2 run on the wall clock: ranks 0-1 are stage 0 (tp pair), 2-3 stage 1. Every step is a
# span (its first step is a prefill); under it, tp's all-reduces and the point-to-point hand-off
# between the stages. Two micro-batches alternate, so both stages work at once. (Four ranks share
# this machine's cores, so widths are noisy.)

# %%
evs = [e for e in tp_pp.events if e.start < 0.25 * max(x.end for x in tp_pp.events)]
ax = plot_timeline(evs, title="serving TP2·PP2, the first quarter of the run (wall clock)")
plt.tight_layout()

# %% [markdown]
# ## Latency and throughput: measured on CPU ranks, modeled on H100s
# On this machine: one request alone (its inter-token latency is the per-token latency), then eight at
# once (throughput), for one rank, TP2 and PP2. The ranks share the CPU cores and talk over gloo, so
# splitting a model this small costs more in messages than it saves in arithmetic; the numbers are
# what this machine measures, not what a GPU would do.

# %%
cpu_cfg = GPTConfig(vocab=256, seq=64, layers=4, heads=8, hidden=256)
alone = make_requests(1, cpu_cfg.vocab, 8, 24, seed=1)
crowd = make_requests(8, cpu_cfg.vocab, 8, 16, seed=2)
print(f"{'layout':<8}{'ITL p50, 1 request':>20}{'tokens/s, 8 requests':>22}")
for label, sc in [("1 rank", ServeConfig()), ("TP2", ServeConfig(tp=2)), ("PP2", ServeConfig(pp=2))]:
    itl = serve(cpu_cfg, alone, sc).summary()["itl_p50"]
    tput = serve(cpu_cfg, crowd, sc).summary()["throughput"]
    print(f"{label:<8}{itl * 1e3:>17.2f} ms{tput:>22,.0f}")

# %% [markdown]
# On H100s the roofline says what the layouts do. Per-token latency of Llama 3 8B on 1-8 GPUs: TP
# divides the bytes each GPU reads (and adds small all-reduces), so it **lowers** latency; PP reads
# the stages' weights in turn and adds hops, so it **raises** it. At batch 1 the TP latency is exactly
# the formula: the weights and the cache over HBM, plus 2L one-shot all-reduces of 2h bytes.

# %%
gpus = [1, 2, 4, 8]
tp_lat = [S.token_latency("8b", S.Layout(tp=k), "h100", 1, 1024) for k in gpus]
pp_lat = [S.token_latency("8b", S.Layout(pp=k), "h100", 1, 1024) for k in gpus]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(gpus, np.array(tp_lat) * 1e3, "o-", label="TP", color=COLORS["all_reduce"])
ax.plot(gpus, np.array(pp_lat) * 1e3, "s-", label="PP", color=COLORS["send"])
ax.set(xlabel="GPUs", ylabel="ms per token (batch 1)", xticks=gpus,
       title="Llama 3 8B on H100s, context 1024 (modeled)")
ax.legend()
plt.tight_layout()
assert all(a > b for a, b in zip(tp_lat, tp_lat[1:])) and all(a < b for a, b in zip(pp_lat, pp_lat[1:]))

link, c, t = get_link(h100.intra_node), 2048, 8
kv = 2 * m70.layers * 1 * m70.head_dim * 2          # K and V bytes per token per GPU: 8 KV heads over tp 8, one each
formula = (2 * m70.matmul_params / t + c * kv) / h100.memory_bandwidth \
    + 2 * m70.layers * (link.latency + (t - 1) * 2 * m70.hidden / link.bandwidth)
modeled = S.token_latency(m70, S.Layout(tp=8), "h100", 1, c)
print(f"Llama 2 70B, TP8, batch 1, context {c}: modeled {modeled * 1e3:.4f} ms, formula {formula * 1e3:.4f} ms")
assert modeled == formula

# %% [markdown]
# Llama 2 70B on one node of 8 H100s, three layouts: TP8, PP8 and TP4·PP2 (TP inside a node, PP
# across nodes is the standard multi-node layout; here both fit one node). Throughput against the
# number of concurrent sequences (each with 512 cached tokens), up to what the cache can hold:

# %%
layouts = {"TP8": S.Layout(tp=8), "PP8": S.Layout(pp=8), "TP4·PP2": S.Layout(tp=4, pp=2)}
c = 512
conc = np.unique(np.logspace(0, 11.5, 40, base=2).astype(int))
fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.6))
curves = {}
for name, lay in layouts.items():
    cap = S.max_concurrency("70b", lay, "h100", c)
    n = conc[conc <= cap]
    tput, itl = zip(*(S.decode_throughput("70b", lay, "h100", int(k), c) for k in n))
    curves[name] = dict(zip(n.tolist(), tput))
    a0.loglog(n, tput, label=name)
    a1.semilogx(n, np.array(itl) * 1e3, label=name)
a0.set(xlabel="concurrent sequences", ylabel="tokens/s", title="throughput (modeled, 8 H100s, context 512)")
a1.set(xlabel="concurrent sequences", ylabel="ms per token", title="inter-token latency")
a0.legend(); a1.legend()
plt.tight_layout()
print(S.compare("70b", list(layouts.values()), "h100", c, (1, 16, 128, 512, 1024, 2048)))
wins = {k: max(curves, key=lambda name: curves[name].get(k, 0)) for k in curves["TP8"]}
switch = min(k for k in wins if wins[k] != "TP8")
first_pp = min(k for k in curves["PP8"] if curves["PP8"][k] > curves["TP8"][k])
print(f"\nTP8 has the most tokens/s up to {max(k for k in wins if k < switch)} concurrent sequences (of those "
      f"drawn); by {switch} {wins[switch]} has passed it: TP's all-reduces of b·h bytes grow with the batch")
print(f"PP8 passes TP8 only from {first_pp} sequences, at "
      f"{S.token_latency('70b', layouts['PP8'], 'h100', first_pp / 8, c) * 1e3:.0f} ms per token")
assert wins[min(wins)] == "TP8" and wins[max(wins)] != "TP8"
itl_alone = {name: S.token_latency("70b", lay, "h100", 1, c) for name, lay in layouts.items()}
assert itl_alone["TP8"] < itl_alone["TP4·PP2"] < itl_alone["PP8"]                 # TP lowers latency, PP raises it

# %% [markdown]
# So: TP8 for the lowest latency and light load; TP4·PP2 for throughput under heavy load; PP8 only
# when latency does not matter. `plan.serving.choose_layout` does this search for any model, GPU count
# and latency target (also `python -m minipar.plan.serving`): the layout with the most tokens/s at
# the highest concurrency whose inter-token latency still meets the target and whose cache fits.

# %%
for target in (0.008, 0.030):
    plan = S.choose_layout("70b", 8, "h100", latency_target=target, context=2048)
    print(f"target {target * 1e3:g} ms per token, context 2048:\n{plan.table(4)}\n")
assert S.choose_layout("70b", 8, "h100", 0.008, 2048).best["layout"] == S.Layout(tp=8)

# %% [markdown]
# ## Exercise: the admission rule
# Write `can_join(request, now, batch, max_batch, available_blocks, block_size)`: may the waiting
# `request` join the running batch now? It must have arrived (`request.arrival <= now`), the batch
# (`batch` sequences) must have room under `max_batch`, and the `available_blocks` (free and not
# promised to a running sequence) must hold every K/V slot the request will ever use. A request
# caches its prompt and every generated token except the last (that one is returned, never fed back),
# so it needs ⌈(len(prompt) + max_new_tokens − 1) / block_size⌉ blocks.
#
# The checker asks your rule about seven situations, then plugs it into the `Scheduler` above and
# serves a trace through a cache too small for everyone at once. The solution cell below holds a
# working answer (the student copy, `scripts/make_student_copies.py`, empties it).

# %%

# %% tags=["exercise"]
def can_join(request, now, batch, max_batch, available_blocks, block_size):
    """True if the waiting `request` may join the batch at time `now`."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("serve_admission", can_join)
print(verdict)
assert verdict  # solution-only
