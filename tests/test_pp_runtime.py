"""The executor against the single-device reference, and the modeled clock against the simulator."""
import pytest

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
}

CLOCKED = ("1f1b", "zb_h1", "zbv", "dualpipe", "dualpipev")   # re-timed on the modeled clock


def _all_schedules():
    out = {k: train_pipeline(build_schedule(*a), CFG, STEPS, B, seed=0, **kw) for k, (a, kw) in RUNS.items()}
    for k in CLOCKED:                    # one clean step each, for the modeled clock
        out["trace:" + k] = train_pipeline(build_schedule(*RUNS[k][0]), CFG, 1, B, seed=0)["events"]
    return out


@pytest.fixture(scope="module")
def runs():
    return launch(_all_schedules, 4, timeout=120)


@pytest.fixture(scope="module")
def refs():
    return {m: train_reference(CFG, STEPS, B, seed=0, grad_accum=m) for m in (4, 8)}


@pytest.mark.parametrize("label", list(RUNS))
def test_parity_with_reference(runs, refs, label):
    ref = refs[RUNS[label][0][2]]
    ref_params = dict(ref.model.named_parameters())
    per_rank = [r[label] for r in runs]
    losses = [sum(r["losses"][i] for r in per_rank) for i in range(STEPS)]
    assert losses == pytest.approx(ref.losses, abs=1e-5)
    seen = set()
    for r in per_rank:
        for n, g in r["grads"].items():
            assert (g - ref.grads[n]).abs().max() < 1e-5, (label, n)
            assert (r["params"][n] - ref_params[n]).abs().max() < 1e-5, (label, n)
            seen.add(n)
    assert seen == set(ref.grads)   # every parameter lives on some rank


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


@pytest.mark.parametrize("cfg,batch,match", [
    (CFG.replace(layers=6), 8, "multiple of 4 layers"),
    (CFG, 6, "multiple of 4"),
    (CFG.replace(experts=2), 8, "experts=0"),
])
def test_bad_config_is_caught_before_launch(cfg, batch, match):
    with pytest.raises(ValueError, match=match):
        check_config(build_schedule("1f1b", 4, 4), cfg, batch)
    check_config(build_schedule("1f1b", 4, 4), CFG, 8)


def _eight():
    return {name: train_pipeline(build_schedule(name, 8, 16), CFG, 1, 16, seed=0) for name in ("dualpipe", "zb_h2")}


def test_parity_on_eight_ranks():
    """DualPipe on 8 ranks walks every branch of its 8 steps (half-rank positions 0..3)."""
    runs = launch(_eight, 8, timeout=180)
    ref = train_reference(CFG, 1, 16, seed=0, grad_accum=16)
    for name in ("dualpipe", "zb_h2"):
        assert sum(r[name]["losses"][0] for r in runs) == pytest.approx(ref.losses[0], abs=1e-5)
        for r in runs:
            for n, g in r[name]["grads"].items():
                assert (g - ref.grads[n]).abs().max() < 1e-5, (name, n)
