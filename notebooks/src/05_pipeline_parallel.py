# %% [markdown]
# # 05 · Pipeline parallelism: schedules as data, one simulator, one executor
#
# **Pipeline parallelism** (PP) cuts the model by depth: rank r holds a contiguous slice of layers (a
# *stage*), and activations flow down the ranks in the forward pass and gradients flow back up. A batch
# is split into m *micro-batches* so that the ranks work on different micro-batches at the same time.
# What remains idle is the **bubble**, and every schedule since GPipe is a way to shrink it:
#
# | schedule | source | bubble (idle per rank) | activations held (rank 0) |
# |---|---|---|---|
# | GPipe | Huang et al. 2019, Sec. 2.2 | (p−1)(t_f+t_b) = **(p−1)/m** of the ideal m(t_f+t_b) | m |
# | 1F1B (PipeDream-Flush) | Narayanan et al. 2021, Sec. 2.2.1 | (p−1)(t_f+t_b) | p |
# | interleaved 1F1B, v chunks | Narayanan et al. 2021, Sec. 2.2 | (p−1)(t_f+t_b)/v = **(p−1)/(vm)** of ideal | more |
# | ZB-H1 | Qi et al. 2024 (Zero Bubble), Table 1 | (p−1)(t_f+t_b−2t_w) ≈ **1/3 of 1F1B** | p |
# | ZB-H2, ZB-V | Qi et al. 2024, Sec. 3, 6 | (p−1)(t_f+t_b−3t_w) ≈ **0** | 2p−1 / p |
# | DualPipe / DualPipeV | DeepSeek-V3 report, Table 2 | (PP/2−1)(F&B+B−3W), F&B an overlapped pair | PP+1 chunks (PP = p / 2p) |
#
# with p ranks, m micro-batches, t_f / t_b the forward / full-backward time of one micro-batch on one
# rank and t_w the weight-gradient part of t_b. Zero-bubble schedules split the backward into
# **I** (gradient w.r.t. the stage input, which the previous stage is waiting for) and **W** (gradient
# w.r.t. the weights, which nobody waits for), and use the W's to fill the gaps.
#
# In minipar a schedule is **data**: per-rank lists of actions like `0F1` (stage 0, forward,
# micro-batch 1). Generators make them, a validator checks them, one simulator times them, one
# executor runs them on real ranks, and one renderer draws both.

# %%
import inspect
import os

import ipywidgets as widgets
import matplotlib.pyplot as plt

from minipar import launch, pp, sim, trace
from minipar.exercises import NotYet, check
from minipar.explore import explorer
from minipar.model import GPTConfig, train_reference
from minipar.pp import build_schedule, simulate
from minipar.pp.pipedream import pipedream_reference, train_pipedream, versions_used
from minipar.pp.runtime import StepRunner, train_pipeline
from minipar.timeline import plot_timeline

print(build_schedule("1f1b", 4, 8))

# %% [markdown]
# ## 1 · The bubble of every schedule, side by side
# Each schedule for p = 4 ranks and m = 8 micro-batches, timed by `pp.simulate` with t_f = 1, t_b = 2
# and t_w = 1 (so F = I = W, the papers' assumption). Blue F, green B, light green I, purple W.

# %%
P, M = 4, 8
names = ["naive", "gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_h2", "zbv", "dualpipe", "dualpipev", "pipedream"]
fig, axes = plt.subplots(len(names), 1, figsize=(11, 1.35 * len(names)), sharex=False)
results = {}
for ax, name in zip(axes, names):
    s = build_schedule(name, P, M, 2 if name == "interleaved_1f1b" else 1)
    r = results[name] = simulate(s, t_f=1.0, t_b=2.0, t_w=1.0)
    plot_timeline(r.events(), ax=ax, unit="units", label=False, legend=False, clock="modeled")
    ax.set_title(f"{name}: makespan {r.makespan:g}, bubble {r.bubble_fraction:.0%}, "
                 f"peak activations {max(r.peak_activations.values())}", fontsize=9, loc="left")
    ax.set_xlabel("")
    ax.set_xlim(0, 36)
plt.tight_layout()

# %% [markdown]
# ## 2 · Measured against the formulas
# The simulator reproduces the closed forms exactly (the test suite checks a grid of p, m, v).

# %%
F, B, W = 1.0, 2.0, 1.0
ideal = M * (F + B)
rows = []
for name, r in results.items():
    rows.append((name, r.makespan, (r.makespan - ideal) / ideal, max(r.bubble.values()), max(r.peak_activations.values())))
print(f"{'schedule':<18}{'makespan':>9}{'bubble/ideal':>14}{'idle inside span':>18}{'peak act.':>10}")
for row in rows:
    print(f"{row[0]:<18}{row[1]:>9.1f}{row[2]:>14.3f}{row[3]:>18.1f}{row[4]:>10}")

# GPipe and 1F1B: bubble (p-1)/m of the ideal time; GPipe holds m activations, 1F1B p
assert (results["gpipe"].makespan - ideal) / ideal == (P - 1) / M == (results["1f1b"].makespan - ideal) / ideal
assert results["gpipe"].peak_activations[0] == M and results["1f1b"].peak_activations[0] == P
# interleaved with v = 2: (p-1)/(v m)
assert (results["interleaved_1f1b"].makespan - ideal) / ideal == (P - 1) / (2 * M)
# ZB-H1: a third of 1F1B's idle time, same memory
idle = lambda r: r.makespan - r.busy[0]
assert idle(results["zb_h1"]) == idle(results["1f1b"]) / 3 == (P - 1) * (F + B - 2 * W)
assert results["zb_h1"].peak_activations == results["1f1b"].peak_activations
# ZB-H2 and ZB-V: no idle time inside any rank's span; ZB-H2 holds 2p-1, ZB-V 2p half-size chunks (= p)
assert max(results["zb_h2"].bubble.values()) == 0 and results["zb_h2"].peak_activations[0] == 2 * P - 1
assert max(results["zbv"].bubble.values()) == 0 and max(results["zbv"].peak_activations.values()) == 2 * P
# DeepSeek-V3's Table 2, measured: bubble (PP/2-1)(F&B+B-3W), 2x parameters, PP+1 activations, with F, B, W
# one chunk's costs and F&B an overlapped forward+backward pair. DualPipe: PP = p ranks, a chunk is a rank's
# stage; DualPipeV: PP = 2p stages on p devices, a chunk is half a device. The pair starts once both its
# inputs are in; the bubble is the most any rank idles. With F&B = F+B (no overlap gain) every rank idles
# exactly the table's amount; with overlap (F&B = 2.5 here) the middle ranks do.
print(f"\n{'':<10}{'F&B':>5}{'idle (max rank)':>17}{'table':>7}{'params/rank':>13}{'activations':>13}{'table':>7}")
for name, PP, chunk in (("dualpipe", P, 1.0), ("dualpipev", 2 * P, 0.5)):
    for t_fb in (F + B, 2.5):
        r = simulate(build_schedule(name, P, M), F, B, W, t_fb=t_fb)
        f, b, w, fb = F * chunk, B * chunk, W * chunk, t_fb * chunk
        table = (PP / 2 - 1) * (fb + b - 3 * w)
        worst = max(r.makespan - r.busy[q] for q in range(P))
        params = len(r.schedule.stages_of(0))   # in the table's unit: one of the PP stages
        acts = max(r.peak_activations.values())
        print(f"{name:<10}{fb:>5.2f}{worst:>17.2f}{table:>7.2f}{params:>12.0f}x{acts:>13}{PP + 1:>7}")
        assert abs(worst - table) < 1e-9 and params == 2 and acts == PP + 1

# %% [markdown]
# DualPipe drawn the way the DeepSeek-V3 report draws it: each black box is an overlapped F&B pair, a
# forward of one direction and a backward of the other, that starts only when both of its inputs are in
# (`schedule.overlapped`). Here the overlap hides a sixth of each pair (F&B = 2.5 against F + B = 3).

# %%
from matplotlib.patches import Rectangle

dp_sched = build_schedule("dualpipe", 4, 10)
r = simulate(dp_sched, 1.0, 2.0, 1.0, t_fb=2.5)
ax = plot_timeline(r.events(), unit="units", clock="modeled", legend=False,
                   title=f"DualPipe, p = 4, m = 10 (5 each way), F&B = 2.5: makespan {r.makespan:g}")
row = {q: i for i, q in enumerate(sorted(dp_sched.actions))}
for f, b in dp_sched.overlapped.items():
    q = dp_sched.stage_to_rank[f.stage]
    start, end = r.times[f][0], r.times[b][1]
    ax.add_patch(Rectangle((start, row[q] - 0.44), end - start, 0.50, fill=False, edgecolor="black", linewidth=1.2))
ax.figure.set_size_inches(11, 2.6)
plt.show()
print(f"{len(dp_sched.overlapped)} F&B pairs; the most any rank idles: "
      f"{max(r.makespan - r.busy[q] for q in range(4)):g} = (PP/2-1)(F&B+B-3W) = {(4 / 2 - 1) * (2.5 + 2 - 3):g}")

# %% [markdown]
# ## 3 · The code
# A generator is a few lines. 1F1B warms up with p−1−r forwards, alternates, then drains (writing it
# is this notebook's exercise, so the student copy leaves this cell out):

# %% tags=["reveals"]
print(inspect.getsource(pp.schedules._one_f_one_b))

# %% [markdown]
# `pp.lower` adds the communication: a SEND after each action whose consumer lives on another rank,
# and a RECV posted one action ahead of the action that needs it, in the order the peer sends (NCCL
# matches point-to-point messages per pair in FIFO order). `pp.validate` checks completeness and order
# and runs the lowered program through the simulator (`minipar.sim`); a cycle of waits is a deadlock.
# The executor walks the lowered list; here is the heart of it, one compute action:

# %%
print(inspect.getsource(StepRunner.compute))

# %% [markdown]
# ## 4 · A real run on 4 simulated ranks, on two clocks
# 1F1B and ZB-H1 on 4 gloo ranks, two AdamW steps, compared with the single-device reference
# (`train_reference` with grad_accum = m). Then the recorded trace is drawn twice: on the wall clock
# (4 ranks sharing this machine's cores, printed below) and on the **modeled clock**: `sim.retime` keeps what happened
# in which order and replaces each duration with the simulator's costs, which reproduces the
# simulator's timeline for that schedule.

# %%
cfg = GPTConfig(vocab=64, seq=16, layers=8, heads=4, hidden=32)
m = 4


def run_both():
    out = {name: train_pipeline(build_schedule(name, 4, m), cfg, steps=2, batch_size=8) for name in ("1f1b", "zb_h1")}
    out["trace"] = train_pipeline(build_schedule("zb_h1", 4, m), cfg, steps=1, batch_size=8)["events"]  # one clean step
    return out


runs = launch(run_both, 4)
ref = train_reference(cfg, steps=2, batch_size=8, grad_accum=m)
for name in ("1f1b", "zb_h1"):
    losses = [sum(r[name]["losses"][i] for r in runs) for i in range(2)]
    gerr = max((g - ref.grads[n]).abs().max().item() for r in runs for n, g in r[name]["grads"].items())
    print(f"{name}: losses {losses} vs reference {ref.losses}; max grad error {gerr:.1e}")
    assert max(abs(a - b) for a, b in zip(losses, ref.losses)) < 1e-5 and gerr < 1e-5

# %%
recorded = trace.merge([r["trace"] for r in runs])
modeled = sim.retime(recorded, {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}, p2p=0.1)
want = simulate(build_schedule("zb_h1", 4, m), 1.0, 2.0, 1.0, t_comm=0.1)
got = {(e.rank, e.name): (e.start, e.end) for e in modeled if e.cat == "compute"}
assert all(abs(got[e.rank, e.name][0] - e.start) < 1e-9 for e in want.events())   # the simulator's timeline
print(f"modeled makespan {max(e.end for e in modeled if e.cat == 'compute'):g} = simulated {want.makespan:g}; "
      f"the wall clock: 4 ranks on {os.cpu_count()} CPU cores")
fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.2))
# sends are left out of the wall-clock picture: a gloo isend's handle is only checked between actions
plot_timeline([e for e in recorded if e.name != "send"], ax=a1,
              title=f"ZB-H1, recorded (wall clock, 4 ranks on {os.cpu_count()} CPU cores; grey: receives)")
plot_timeline(modeled, ax=a2, unit="units", clock="modeled",
              title="the same run re-timed: t_f=1, t_i=t_w=1, transfer 0.1 (= pp.simulate)")
plt.tight_layout()

# %% [markdown]
# ## 5 · PipeDream: no flush, stale weights, stashed versions
# Asynchronous PipeDream (Narayanan et al. 2019) runs 1F1B forever and updates each stage after every
# backward. Micro-batch i's forward on stage s therefore sees weights v(s, i) updates old, and
# **weight stashing** makes its backward use the same version. PipeDream-2BW (Narayanan et al. 2021)
# updates once every m ≥ p micro-batches, so only two versions are ever alive. The versions each
# micro-batch's forward (and backward) uses, read off the schedule, per stage:

# %%
for name in ("pipedream", "pipedream_2bw"):
    s = build_schedule(name, 4, 12)
    v = versions_used(s)
    print(name)
    for stage in range(4):
        print(f"  stage {stage}: " + " ".join(f"{v[stage, i]:>2}" for i in range(12)))


def pipedreams():
    return {k: train_pipedream(build_schedule(k, 4, 12), GPTConfig(vocab=64, seq=16, layers=4, heads=4, hidden=32))
            for k in ("pipedream", "pipedream_2bw")}


pd = launch(pipedreams, 4)
for name in ("pipedream", "pipedream_2bw"):
    want, _ = pipedream_reference(build_schedule(name, 4, 12), GPTConfig(vocab=64, seq=16, layers=4, heads=4, hidden=32))
    got = {i: l for r in pd for i, l in r[name]["losses"].items()}
    assert max(abs(got[i] - want[i]) for i in want) < 1e-5
    log = [e for r in pd for e in r[name]["log"]]
    assert {(s, i): v for k, s, i, v in log if k == "F"} == {(s, i): v for k, s, i, v in log if k == "B"}
    print(f"{name}: losses match the one-device replay; versions alive at once:",
          max(v for r in pd for v in r[name]["max_live"].values()))

# %% [markdown]
# ## 6 · Explore
# Pick a schedule, p, m, v and the costs; the simulator redraws the timeline in place. (Without a live
# kernel, the picture below is the default choice.)

# %%
def draw(schedule, p, m, v, t_f, t_b, t_w, hidden):
    """The simulated timeline; `hidden` is the fraction of the shorter half of a DualPipe F&B pair
    that overlap hides."""
    r = simulate(build_schedule(schedule, p, m, v), t_f, t_b, min(t_w, t_b), t_fb=t_f + t_b - hidden * min(t_f, t_b))
    fig, ax = plt.subplots(figsize=(11, 0.45 * p + 1.4))
    plot_timeline(r.events(), ax=ax, unit="units", label=p * m <= 64, clock="modeled", title=schedule)
    return (f"{schedule}, p={p}, m={m}, v={v}, t_f={t_f:g}, t_b={t_b:g}, t_w={t_w:g}, F&B hidden={hidden:g}: "
            f"makespan {r.makespan:.2f}, bubble {r.bubble_fraction:.1%}, peak activations per rank "
            f"{r.peak_activations}"), fig, r


first = explorer(draw, {
    "schedule": widgets.Dropdown(options=list(pp.SCHEDULES), value="zb_h1", description="schedule"),
    "p": widgets.IntSlider(value=4, min=2, max=8, description="p"),
    "m": widgets.IntSlider(value=8, min=1, max=32, description="m"),
    "v": widgets.IntSlider(value=1, min=1, max=4, description="v"),
    "t_f": widgets.FloatSlider(value=1.0, min=0.1, max=3, description="t_f"),
    "t_b": widgets.FloatSlider(value=2.0, min=0.1, max=6, description="t_b"),
    "t_w": widgets.FloatSlider(value=1.0, min=0.0, max=3, description="t_w"),
    "hidden": widgets.FloatSlider(value=0.0, min=0.0, max=1.0, description="F&B hidden")})
assert first.makespan == simulate(build_schedule("zb_h1", 4, 8), 1.0, 2.0, 1.0).makespan

# %% [markdown]
# ## 7 · Exercise: write 1F1B
# Return `{rank: [actions]}` for p ranks (stage r on rank r) and m micro-batches, as strings like
# `"0F1"` or `pp.Action(0, "F", 1)`. The checker validates it, simulates it, and asks for the 1F1B
# makespan (m+p−1)(t_f+t_b) with at most p−r micro-batches in flight on rank r, on fixed and
# randomized (p, m). The package's own schedule generators (`build_schedule` and the functions behind
# it) are switched off while your function runs: use them above to explore, not in your answer.

# %% tags=["exercise"]
def my_1f1b(p, m):
    """{rank: [actions]} of 1F1B for p ranks (stage r on rank r) and m micro-batches."""
    raise NotYet("write this function, then run the checker cell")


# %%
verdict = check("pp_1f1b", my_1f1b)
print(verdict)
assert verdict  # solution-only
