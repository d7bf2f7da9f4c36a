"""The executor against the single-device reference, and the modeled clock against the simulator."""

import pytest
import torch
from _parity import assert_grads_match, assert_params_match

from minipar import launch, sim, trace
from minipar.model import GPTConfig, train_reference
from minipar.pp import build_schedule, check_config, simulate
from minipar.pp.runtime import train_pipeline

CFG = GPTConfig(vocab=64, seq=16, layers=8, heads=4, hidden=32)
B, STEPS = 8, 2
RUNS = {  # label: (schedule args, executor options)
    "naive": (("naive", 4, 4), {}),
    "gpipe": (("gpipe", 4, 4), {}),
    "gpipe+recompute": (("gpipe", 4, 4), {"recompute": True}),
    "1f1b": (("1f1b", 4, 4), {}),
    "interleaved_1f1b": (("interleaved_1f1b", 4, 4, 2), {}),
    "zb_h1": (("zb_h1", 4, 4), {}),
    "zb_h2+recompute": (("zb_h2", 4, 8), {"recompute": True}),
    "zbv": (("zbv", 4, 8), {}),
    "dualpipe": (("dualpipe", 4, 8), {}),
    "dualpipev": (("dualpipev", 4, 8), {}),
    "1f1b uneven 1,3,3,1": (("1f1b", 4, 4), {"stage_layers": (1, 3, 3, 1)}),
}

CLOCKED = ("1f1b", "zb_h1", "zbv", "dualpipe", "dualpipev")  # re-timed on the modeled clock


def _all_schedules():
    out = {
        k: train_pipeline(build_schedule(*a), CFG, STEPS, B, seed=0, kind="sgd", **kw)
        for k, (a, kw) in RUNS.items()
    }
    for k in CLOCKED:  # one clean step each, for the modeled clock
        out["trace:" + k] = train_pipeline(build_schedule(*RUNS[k][0]), CFG, 1, B, seed=0)["events"]
    return out


@pytest.fixture(scope="module")
def runs():
    return launch(_all_schedules, 4, timeout=120)


@pytest.fixture(scope="module")
def refs():
    """Per micro-batch count m: the first step's gradients, and STEPS SGD steps with m-fold accumulation."""
    return {
        m: (
            train_reference(CFG, 1, B, seed=0, grad_accum=m).grads,
            train_reference(CFG, STEPS, B, seed=0, grad_accum=m, kind="sgd"),
        )
        for m in (4, 8)
    }


def gathered(per_rank, key):
    """{name: tensor} over every rank's stages; a name two ranks hold (DualPipe's mirrored copies) must agree."""
    out = {}
    for r in per_rank:
        for n, t in r[key].items():
            assert n not in out or torch.equal(out[n], t), n
            out[n] = t
    return out


@pytest.mark.parametrize("label", list(RUNS))
def test_parity_with_reference(runs, refs, label):
    """Every schedule: the gradients of the first step (every stage's, summed over micro-batches and, for
    DualPipe, over the two copies), the step losses, and the parameters after STEPS SGD steps."""
    first, ref = refs[RUNS[label][0][2]]
    per_rank = [r[label] for r in runs]
    assert_grads_match(
        gathered(per_rank, "first_grads"), first, what=label
    )  # every parameter lives on some rank
    losses = [sum(r["losses"][i] for r in per_rank) for i in range(STEPS)]
    assert losses == pytest.approx(ref.losses, abs=1e-5)
    assert_params_match(gathered(per_rank, "params"), dict(ref.model.named_parameters()), what=label)


@pytest.mark.parametrize("label", CLOCKED)
@pytest.mark.parametrize("t_comm", [0.0, 0.3])
def test_modeled_clock_reproduces_simulator(runs, label, t_comm):
    """Re-time the recorded run with the simulator's costs: every action lands where simulate() put it."""
    schedule = build_schedule(*RUNS[label][0])
    events = trace.merge([r["trace:" + label] for r in runs])
    c = schedule.chunk_cost
    modeled = sim.retime(events, {"F": 1.0 * c, "B": 2.0 * c, "I": 1.0 * c, "W": 1.0 * c}, p2p=t_comm)
    want = simulate(schedule, 1.0, 2.0, 1.0, t_comm=t_comm)
    got = {(e.rank, e.name): (e.start, e.end) for e in modeled if e.cat == "compute"}
    assert len(got) == len(want.times)
    for ev in want.events():
        assert got[ev.rank, ev.name] == pytest.approx((ev.start, ev.end)), ev.name
    assert max(e.end for e in modeled if e.cat == "compute") == pytest.approx(want.makespan)


@pytest.mark.parametrize(
    "cfg,batch,match",
    [
        (CFG.replace(layers=3), 8, "layers=3 cannot fill 4 model parts"),
        (CFG, 6, "batch_size=6 must be divisible by num_microbatches=4"),
        (CFG.replace(experts=2, moe_groups=2), 8, "moe_groups=2 must be divisible by num_microbatches=4"),
    ],
)
def test_bad_config_is_caught_before_launch(cfg, batch, match):
    with pytest.raises(ValueError, match=match):
        check_config(build_schedule("1f1b", 4, 4), cfg, batch)
    check_config(build_schedule("1f1b", 4, 4), CFG.replace(layers=6), 8)  # uneven: balanced by pp.partition
    check_config(build_schedule("1f1b", 4, 4), CFG.replace(experts=2, moe_groups=4), 8)


MOE = GPTConfig(vocab=64, seq=16, layers=4, heads=4, hidden=32, experts=4, top_k=2, moe_groups=4)


def _moe():
    return train_pipeline(build_schedule("1f1b", 2, 4), MOE, 1, 8, seed=1, stage_layers=(3, 1))


def test_moe_stages_with_uneven_layers_match_the_reference():
    """The one stage builder cuts MoE blocks too: each stage backpropagates its own load-balancing
    loss (seed 1: routing without near-tied top-k choices, which another order could flip)."""
    runs = launch(_moe, 2, timeout=120)
    ref = train_reference(MOE, 1, 8, seed=1)  # moe_groups=4: each group is one micro-batch's tokens
    assert sum(r["losses"][0] for r in runs) == pytest.approx(ref.losses[0], abs=1e-5)
    grads = gathered(runs, "first_grads")
    assert_grads_match(grads, {n: ref.grads.get(n, torch.zeros_like(g)) for n, g in grads.items()})


def _eight():
    return {
        name: train_pipeline(build_schedule(name, 8, 16), CFG, 1, 16, seed=0)
        for name in ("dualpipe", "zb_h2")
    }


def test_parity_on_eight_ranks():
    """DualPipe on 8 ranks walks every branch of its 8 steps (half-rank positions 0..3)."""
    runs = launch(_eight, 8, timeout=180)
    ref = train_reference(CFG, 1, 16, seed=0, grad_accum=16)
    for name in ("dualpipe", "zb_h2"):
        assert sum(r[name]["losses"][0] for r in runs) == pytest.approx(ref.losses[0], abs=1e-5)
        assert_grads_match(gathered([r[name] for r in runs], "first_grads"), ref.grads, what=name)
