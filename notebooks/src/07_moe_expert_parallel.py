# %% [markdown]
# # 07 · Mixture of experts and expert parallelism
#
# A dense MLP spends the same FLOPs on every token. A **mixture-of-experts (MoE)** layer holds E
# MLPs, the *experts*, and a small **router** that sends each token to k of them. Parameters grow
# with E, FLOPs per token only with k. Switch Transformer (Fedus et al. 2021) uses k = 1, GShard
# (Lepikhin et al. 2020) and Mixtral use k = 2, DeepSeek-V3 (2024) uses 8 of 256 plus a shared expert.
#
# For a token x with router logits s = W_r·x:
#
# | piece | formula | source |
# |---|---|---|
# | softmax router | p = softmax(s); pick top-k of p; weights g = p of the chosen, renormalized when k > 1 | Switch eq. 1-2, GShard |
# | sigmoid router | a = σ(s); pick top-k of a + b; g = a / Σ a over the chosen | DeepSeek-V3 eq. 15-16 |
# | output | y = Σ over kept choices g_j · Expert_j(x) (+ SharedExpert(x)) | |
# | capacity | C = max(min, ⌈T·k·CF / E⌉) slots per expert; choices beyond C are **dropped** | Switch eq. 4, GShard Alg. 1 |
# | aux loss | α·E·Σ_i f_i·P_i, f_i = share of first choices on expert i, P_i = mean probability | Switch eq. 4-6 |
# | z-loss | β·mean(logsumexp(s)²) | ST-MoE eq. 5 |
# | aux-loss-free | after each step b_i ← b_i + γ·sign(mean load − load_i); b only picks, never weighs | DeepSeek-V3 §2.1.2 |
#
# A dropped token is not lost: the block computes x + moe(x), so a token with every choice dropped
# leaves the layer unchanged through the residual. **Expert parallelism** (GShard §3.2) puts E/ep
# experts on each of ep ranks; tokens travel to their experts with an **all-to-all** and come back with
# a second one. Under uniform routing each rank sends, per all-to-all,
#
# $$T\cdot k\cdot h\cdot\frac{ep-1}{ep}\ \text{values}$$
#
# off-rank (T local tokens, hidden size h): a 1/ep share of the rows stays home.

# %%
import inspect

import matplotlib.pyplot as plt
import torch

from minipar import ep as EP
from minipar import trace
from minipar.exercises import NotYet, check
from minipar.model import GPT, GPTConfig
from minipar.moe import MoE, capacity
from minipar.timeline import COLORS, plot_timeline

torch.set_num_threads(1)   # tiny models: one thread is fastest, and it matches the simulated ranks

# %% [markdown]
# ## Routing, drawn
# Twelve tokens, four experts, top-2, capacity factor 1.0: C = ⌈12·2·1.0/4⌉ = 6 slots per expert.
# Expert 1 is popular. Slots are handed out **choice-major** (GShard): every token's first choice,
# in token order, then the second choices. So the late second choices of expert 1 are dropped. (This cell
# computes the drops with the package's routing, the exercise's answer; the student copy keeps only its
# picture.)

# %% tags=["reveals"]
from minipar.moe import assign_slots, route

T, E, K = 12, 4, 2
gen = torch.Generator().manual_seed(3)
logits = torch.randn(T, E, generator=gen)
logits[:, 1] += 1.2
probs, index, weights = route(logits, K, "softmax")
C = capacity(T, E, K, capacity_factor=1.0)
keep = assign_slots(index, E) < C

fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.6, 1]})
a0.imshow(probs.T, cmap="Blues", aspect="auto", vmin=0, vmax=1)
for t in range(T):
    for j in range(K):
        e = int(index[t, j])
        a0.text(t, e, "①②"[j] if keep[t, j] else "✗", ha="center", va="center", fontsize=11,
                color="black" if keep[t, j] else COLORS["all_reduce"])
a0.set(xlabel="token", ylabel="expert", title="router probabilities; ①/② kept choice, ✗ dropped",
       xticks=range(T), yticks=range(E))
routed = torch.bincount(index.flatten(), minlength=E)
kept = torch.bincount(index[keep], minlength=E)
a1.bar(range(E), kept, color=COLORS["F"], label="kept")
a1.bar(range(E), routed - kept, bottom=kept, color=COLORS["all_reduce"], label="dropped")
a1.axhline(C, color="black", ls="--", lw=1, label=f"capacity C = {C}")
a1.set(xlabel="expert", ylabel="choices", title="tokens per expert", xticks=range(E))
a1.legend(fontsize=8)
plt.tight_layout()
print("choices routed per expert:", routed.tolist(), " kept:", kept.tolist(), " dropped:", int((~keep).sum()))
assert (kept <= C).all() and kept.sum() == min(C, routed[1]) + routed.sum() - routed[1]

# %% [markdown]
# ## The code
# Routing and slot assignment are a few tensor operations (`minipar/moe.py`; writing them is the exercise,
# so the student copy leaves this cell out):

# %% tags=["reveals"]
print(inspect.getsource(route))
print(inspect.getsource(assign_slots))

# %% [markdown]
# The layer routes, drops, computes the losses, and hands the kept (token, choice) pairs to the
# dispatcher. `cfg.moe_groups` splits the batch into groups; capacity and the aux loss are per group,
# as in GShard, which is what lets a single device reproduce an expert-parallel run exactly.

# %%
print(inspect.getsource(MoE.forward))

# %% [markdown]
# The dispatcher is the expert-parallel part (`minipar/ep.py`). With one rank the exchanges are
# skipped and the very same code is the single-device layer.

# %%
print(inspect.getsource(EP.dispatch_combine))

# %% [markdown]
# ## Capacity and dropping
# A skewed router (every token leans to expert 0) in a real GPT block, top-1, for a range of capacity
# factors. The dropped fraction falls as CF grows; CF = ∞ is dropless. Tokens whose only choice was
# dropped come out of the MoE as zeros, so the block passes them through its residual unchanged.

# %%
cfg0 = GPTConfig(vocab=64, seq=32, layers=1, heads=4, hidden=32, experts=4, top_k=1)
x = torch.randn(256, cfg0.hidden, generator=torch.Generator().manual_seed(0))
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, float("inf")]
drop = []
for cf in factors:
    moe = GPT(cfg0.replace(capacity_factor=cf), seed=0).blocks[0].mlp
    with torch.no_grad():
        moe.router.weight[0] += 0.5 * x.mean(0) / x.mean(0).pow(2).sum()   # skew: expert 0's logit + 0.5
        y = moe(x)
    s = moe.stats
    drop.append(s["dropped"] / s["choices"])
    assert (s["kept_load"] <= s["capacity"]).all()
    gone = ~s["keep"].any(-1)
    assert torch.equal(y[gone], torch.zeros_like(y[gone]))                  # residual pass-through
    print(f"CF={cf:<5} capacity={s['capacity']:>4}  tokens per expert={s['load'].tolist()}  "
          f"kept={s['kept_load'].tolist()}  dropped={drop[-1]:.1%}")
assert drop[-1] == 0 and all(a >= b for a, b in zip(drop, drop[1:])) and drop[0] > 0.4

fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot([str(f) for f in factors], drop, "o-", color=COLORS["all_reduce"])
ax.set(xlabel="capacity factor", ylabel="dropped fraction", title="top-1, skewed router, 256 tokens")
plt.tight_layout()

# %% [markdown]
# ## Load balancing while training
# Three runs of a 2-layer GPT with a DeepSeek-style sigmoid router (E = 4, top-2), all from the same
# **skewed start**: each MoE block's LayerNorm bias points along expert 0's router row, so every token
# routes to the same two experts (max/mean load = 2, the worst possible for k = 2 of 4).
#
# * **no balancing**: nothing pulls the router back: collapse persists.
# * **aux loss** (α = 0.1; Switch uses 0.01 for long runs, a short run needs a stronger push).
# * **aux-loss-free** (γ = 0.01): only the selection bias moves; no gradient competes with the LM loss.
#
# Load imbalance is max/mean of the tokens routed per expert (worst layer). Per step it is noisy: a
# batch of 16 sequences over 64 token types has uneven composition. The thick line sums the load
# over the last 10 steps.

# %%
cfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2, router="sigmoid",
                aux_alpha=0.0)
STEPS = 80
runs = {"no balancing": EP.train_moe(cfg, steps=STEPS, batch_size=16, skew=1.0),
        "aux loss α=0.1": EP.train_moe(cfg.replace(aux_alpha=0.1), steps=STEPS, batch_size=16, skew=1.0),
        "aux-loss-free γ=0.01": EP.train_moe(cfg, steps=STEPS, batch_size=16, gamma=0.01, skew=1.0)}
colors = [COLORS["all_reduce"], COLORS["F"], COLORS["B"]]

fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.4))
for (name, r), c in zip(runs.items(), colors):
    a0.plot(r.imbalance(), color=c, alpha=0.3, lw=1)
    a0.plot(r.imbalance(10), color=c, lw=2, label=name)
    a1.plot([l - a for l, a in zip(r.losses, r.aux_losses)], color=c, label=name)
a0.axhline(1.2, color="black", ls=":", lw=1)
a0.set(xlabel="step", ylabel="max / mean expert load", title="load imbalance (thick: 10-step window)")
a1.set(xlabel="step", ylabel="cross-entropy (aux loss excluded)", title="language-model loss")
a0.legend(fontsize=8)
a1.legend(fontsize=8)
plt.tight_layout()

for name, r in runs.items():
    ce = r.losses[-1] - r.aux_losses[-1]
    print(f"{name:<22} final imbalance (10-step window) {r.imbalance(10)[-1]:.3f}   "
          f"per step {r.imbalance()[-1]:.3f}   final CE {ce:.3f}   expert bias layer 0 {r.bias[0].numpy().round(3)}")
assert min(runs["no balancing"].imbalance(10)) > 1.9
assert runs["aux-loss-free γ=0.01"].imbalance(10)[-1] < 1.2
assert runs["aux loss α=0.1"].imbalance(10)[-1] < 1.5

# %% [markdown]
# ## Expert parallelism on 4 simulated ranks
# `Mesh(dp=2, ep=2)`: four data shards; each ep pair splits the four experts (2 per rank), and the two
# ranks holding the same experts (the `dp` axis) average their expert gradients. Capacity is computed
# on each rank's local tokens (as in Switch and GShard, per group), so the single-device reference uses
# `moe_groups=4`, one group per data shard, and must drop **the same tokens**. Here is the check,
# after 3 steps: loss, logits, every gradient (router included), the kept masks.

# %%
cfg_ep = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2,
                   capacity_factor=1.25, moe_groups=4)
DP, EPS, B = 2, 2, 16
ranks = EP.run_ep(cfg_ep, ep=EPS, dp=DP, steps=3, batch_size=B)
ref = EP.train_moe(cfg_ep, steps=3, batch_size=B)

grads = {n: g for r in ranks for n, g in r.grads.items()}
errs = {"loss": max(abs(a - b) for a, b in zip(ranks[0].losses, ref.losses)),
        "logits": (torch.cat([r.logits for r in ranks]) - ref.logits).abs().max().item(),
        "grads": max((grads[n] - ref.grads[n]).abs().max().item() for n in ref.grads),
        "router grads": max((grads[n] - ref.grads[n]).abs().max().item() for n in ref.grads if "router" in n)}
print({k: f"{v:.1e}" for k, v in errs.items()}, f" dropped per step {[f'{d:.1%}' for d in ref.dropped]}")
assert set(grads) == set(ref.grads) and max(errs.values()) < 1e-5
assert all(torch.equal(torch.cat([r.keep[i] for r in ranks]), ref.keep[i]) for i in range(cfg_ep.layers))
assert max(ref.dropped) > 0

# %% [markdown]
# ### Who sends what to whom
# Before the tokens move, the ranks all-gather their rows-per-expert tables (step 3 of the dispatcher):
# every rank learns how many rows it will receive from each source, which sizes the uneven
# all-to-all. Layer 0, last step, ep group of rank 0 (ranks 0 and 1):

# %%
table = ranks[0].stats[0]["table"]
print("rows per (source rank, expert):\n", table.numpy())
fig, ax = plt.subplots(figsize=(4, 2.2))
ax.imshow(table, cmap="Purples")
for i in range(table.shape[0]):
    for j in range(table.shape[1]):
        ax.text(j, i, int(table[i, j]), ha="center", va="center")
ax.set(xlabel="expert (0-1 on ep rank 0, 2-3 on ep rank 1)", ylabel="source ep rank", yticks=range(EPS),
       title="tokens sent by the all-to-all")
plt.tight_layout()

# %% [markdown]
# ### Bytes, from the trace
# Each MoE layer runs four all-to-alls per step: dispatch and combine in forward, their transposes in
# backward. The trace's `wire_bytes` of one is exactly the rows that left the rank × h × 4 bytes; the
# formula T·k·h·(ep−1)/ep·4 assumes uniform routing and no drops, so the measured value sits near it.

# %%
T_local = B // (DP * EPS) * cfg_ep.seq
formula = EP.a2a_formula(T_local, cfg_ep.top_k, cfg_ep.hidden, EPS)
for rank, r in enumerate(ranks):
    a2a = [e for e in r.events if e.name == "all_to_all"]
    per_step = sum(e.wire_bytes for e in a2a) / 3
    last = a2a[-4 * cfg_ep.layers:]
    for layer, s in enumerate(r.stats):
        sent = s["send_splits"]
        assert last[2 * layer].wire_bytes == (sum(sent) - sent[rank % EPS]) * cfg_ep.hidden * 4
    print(f"rank {rank}: all-to-all wire bytes per step {per_step:>9,.0f}   "
          f"formula 4 x {cfg_ep.layers} layers x {formula:,.0f} = {4 * cfg_ep.layers * formula:,.0f}   "
          f"ratio {per_step / (4 * cfg_ep.layers * formula):.2f}")
    assert 0.6 < per_step / (4 * cfg_ep.layers * formula) < 1.4

# %% [markdown]
# ### The all-to-all on a timeline
# The last training step on the four ranks: forward (F) holds the dispatch and combine all-to-alls of
# both MoE layers (and the tiny all-gather of split sizes before each), backward (B) their
# transposes, then the gradient all-reduces: dense parameters over all four ranks, experts over `dp`.

# %%
t0 = min(max(e.start for e in r.events if e.name == "F") for r in ranks)   # the last step's start
last_step = trace.merge([[e for e in r.events if e.start >= t0] for r in ranks])
plot_timeline(last_step, title="one step of MoE training, Mesh(dp=2, ep=2), wall clock")
plt.tight_layout()
kinds = {e.name for e in last_step if e.cat == "comm"}
assert {"all_to_all", "all_gather", "all_reduce"} <= kinds

# %% [markdown]
# ## Exercise: top-k routing with capacity
# Write `my_topk_route(probs, k, capacity)`: `probs` is [T, E] (router softmax). Return
# `(index, weights, keep)`:
# * `index` [T, k]: the k best experts of each token, best first;
# * `weights` [T, k]: their probabilities, renormalized to sum to 1 when k > 1 (k = 1 keeps the raw one);
# * `keep` [T, k] bool: at most `capacity` choices per expert, every token's first choice (in token
#   order) served before any second choice.
#
# Write it in the cell below and run the checker: it compares with the package's routing on fixed and
# randomized cases, drops included. `minipar.moe`'s own routing and slot assignment are switched off
# while your function runs.

# %%

# %% tags=["exercise"]
def my_topk_route(probs, k, capacity):
    """(index, weights, keep) of top-k routing with `capacity` slots per expert, choice-major."""
    raise NotYet("write this function, then run the checker cell")

# %%
verdict = check("moe_topk_capacity", my_topk_route)
print(verdict)
assert verdict  # solution-only
