"""The planner: formulas pinned to the papers, the step-time model against published
measurements, the simulator wiring, the search and the command line (its exercise: test_exercises.py)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import plan
from minipar.plan import validation
from minipar.plan.__main__ import main
from minipar.plan.pipeline import _closed_form, pipeline_makespan

s, b, h, a, t = 2048, 1, 12288, 96, 8          # GPT-3 175B layer, as in Korthikanti 2022
sbh = s * b * h


# ----------------------------------------------------------------------------- formulas
def test_num_params_reproduces_megatron_2021_table1_to_a_tenth_of_a_billion():
    for P, heads, hidden, layers, *_ in validation.MEGATRON_2021_TABLE1:
        assert round(plan.num_params(layers, hidden, 51200, 2048) / 1e9, 1) == P
    assert plan.num_params(96, 12288, 51200, 2048) == pytest.approx(174.6e9, rel=1e-3)   # GPT-3


def test_zero_table1_reproduced_to_the_papers_rounding():
    rows = validation.zero_table()
    assert len(rows) == 54 and all(r["match"] for r in rows), [r for r in rows if not r["match"]]
    assert plan.model_state_bytes(7.5e9, 64, 1) / 1e9 == pytest.approx(31.40625)      # printed 31.4
    assert plan.model_state_bytes(1e12, 1024, 3) / 1e9 == pytest.approx(15.625)       # printed 15.6
    # the rounding check itself can fail
    assert not validation.paper_rounding_matches(41.4, 41.3) and not validation.paper_rounding_matches(7.6, 7.5)


@pytest.mark.parametrize("tp_, sp, rc, per_sbh", [
    (1, False, None, 34 + 5 * a * s / h),           # 34 + 80 = 114
    (t, False, None, 10 + 24 / t + 5 * a * s / (h * t)),
    (t, True, None, 34 / t + 5 * a * s / (h * t)),
    (t, False, "selective", 10 + 24 / t),
    (t, True, "selective", 34 / t),
    (t, False, "full", 2), (t, True, "full", 2 / t)])
def test_activation_bytes_match_korthikanti_table2(tp_, sp, rc, per_sbh):
    got = plan.activation_bytes_per_layer(s, b, h, a, tp=tp_, sequence_parallel=sp, recompute=rc)
    assert got == pytest.approx(sbh * per_sbh, rel=1e-12)
    assert plan.activation_bytes_per_layer(s, b, h, a, tp_, sp, rc, bytes_per_value=4) == pytest.approx(2 * got)


def test_selective_recompute_saves_what_korthikanti_reports():
    assert validation.selective_recompute_savings(2048, 12288, 96) == pytest.approx(0.70, abs=0.005)   # GPT-3
    assert validation.selective_recompute_savings(2048, 20480, 128) == pytest.approx(0.65, abs=0.005)  # MT-NLG


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 8), st.sampled_from([512, 2048, 8192]),
       st.sampled_from([(32, 4096), (64, 8192), (96, 12288)]), st.booleans())
def test_memory_orderings_hold_for_any_layout(t_, b_, s_, ah, sp):
    a_, h_ = ah
    none, sel, full = (plan.activation_bytes_per_layer(s_, b_, h_, a_, t_, sp, rc) for rc in (None, "selective", "full"))
    assert none > sel > full > 0
    assert plan.activation_bytes_per_layer(s_, b_, h_, a_, t_, True, None) <= \
        plan.activation_bytes_per_layer(s_, b_, h_, a_, t_, False, None)     # SP never costs memory
    states = [plan.model_state_bytes(1e9 * b_, 8, z) for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[3] == pytest.approx(states[0] / 8)


def test_flops_formulas():
    B, l, V = 1536, 96, 51200
    base = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    assert plan.model_flops(l, h, V, s, B) == pytest.approx(base)
    assert plan.hardware_flops(l, h, V, s, B, "full") == pytest.approx(
        96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h)))              # Narayanan 2021 Eq. 3
    assert plan.hardware_flops(l, h, V, s, B, "selective") - base == pytest.approx(4 * B * s**2 * l * h)
    assert plan.hardware_flops(l, h, V, s, B, None) == base
    assert plan.mfu(312e12 * 8, 2.0, 8, 312e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recompute"):
        plan.hardware_flops(l, h, V, s, B, "some")


def test_context_parallel_splits_tokens_but_scores_span_every_key():
    one = {rc: plan.activation_bytes_per_layer(32768, 1, 8192, 64, 8, True, rc) for rc in (None, "selective")}
    two = {rc: plan.context_parallel_layer_bytes(32768, 2, 1, 8192, 64, 8, True, rc) for rc in (None, "selective")}
    assert two["selective"] == pytest.approx(one["selective"] / 2)       # per-token tensors: halved
    assert two[None] == pytest.approx(one[None] / 2)                      # scores (s/c)·s: halved too, not quartered
    e1 = plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=8)
    ring = plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=4, cp=2)
    uly = plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=4, cp=2, cp_kind="ulysses")
    assert ring.time["compute"] == pytest.approx(e1.time["compute"])      # the same work, split differently
    assert ring.memory["activations"] == pytest.approx(e1.memory["activations"] / 2, rel=0.01)
    assert ring.comm["cp"]["count"] > 0 and uly.comm["cp"]["count"] > 0 and e1.comm["cp"]["count"] == 0
    assert uly.step_time > ring.step_time          # Ulysses' all-to-alls are exposed; the ring hides under attention
    with pytest.raises(ValueError, match="cp_kind"):
        plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=4, cp=2, cp_kind="zigzag")


def test_in_flight_microbatches_by_schedule():
    assert plan.in_flight_microbatches("gpipe", 4, 16) == 16
    assert plan.in_flight_microbatches("1f1b", 4, 16) == 4
    assert plan.in_flight_microbatches("1f1b", 4, 2) == 2
    assert plan.in_flight_microbatches("interleaved", 4, 16, v=2) == pytest.approx(4 * (1 + 3 / 8))
    with pytest.raises(ValueError, match="schedule"):
        plan.in_flight_microbatches("bogus", 4, 16)


def test_comm_bytes_per_axis():
    psi, k = 1e9, 8
    c1 = plan.comm_bytes(24, 1024, 2048, 1, 1, psi, dp=k, zero_stage=1)
    assert c1["dp"]["wire"] == pytest.approx(2 * (k - 1) / k * 2 * psi)            # ring all-reduce of bf16 grads
    c3 = plan.comm_bytes(24, 1024, 2048, 1, 1, psi, dp=k, zero_stage=3)
    assert c3["dp"]["wire"] / c1["dp"]["wire"] == pytest.approx(1.5)               # ZeRO: 3Ψ vs 2Ψ
    c = plan.comm_bytes(24, 1024, 2048, 2, 4, psi, tp=4, pp=2, v=2, sequence_parallel=True, recompute="full")
    act = 2048 * 2 * 1024 * 2
    assert c["tp"]["count"] == 6 * 12 * 4 and c["tp"]["payload"] == pytest.approx(6 * 12 * 4 * act)
    assert c["pp"]["payload"] == pytest.approx(2 * 2 * 4 * act / 4)               # v·m sends each way, /t with SP
    e = plan.comm_bytes(24, 1024, 2048, 1, 1, psi, ep=8, moe_layers=24, top_k=2)
    assert e["ep"]["wire"] == pytest.approx(4 * 24 * 2 * 2048 * 1024 * 2 * 7 / 8)


# ----------------------------------------------------------------------------- pipeline ↔ simulator
def test_pipeline_uses_the_simulator_and_agrees_with_closed_forms():
    assert plan.simulator_available()
    for sched, p, m, v in [("gpipe", 4, 8, 1), ("1f1b", 8, 100, 1), ("interleaved", 4, 16, 2), ("zb-h1", 4, 8, 1)]:
        sim, _ = pipeline_makespan(sched, p, m, v, 1.0, 2.0)
        assert sim == pytest.approx(_closed_form(sched, p, m, v, 1.0, 2.0, 0.0))


def test_pipeline_extrapolation_equals_a_full_simulation_with_communication():
    from minipar.pp import build_schedule, simulate
    full = simulate(build_schedule("interleaved_1f1b", 8, 64, 2), t_f=1.0, t_b=3.0, t_comm=0.2).makespan
    got, bubble = pipeline_makespan("interleaved", 8, 64, 2, 1.0, 3.0, 0.2)
    assert got == pytest.approx(full, rel=1e-9) and got > _closed_form("interleaved", 8, 64, 2, 1.0, 3.0, 0.0)
    assert 0 < bubble < 1


# ----------------------------------------------------------------------------- step-time model vs papers
def test_megatron_2021_throughput_within_15_percent_on_every_row():
    rows = validation.megatron_table()
    errors = [r["error"] for r in rows]
    assert len(rows) == 10 and max(map(abs, errors)) <= 0.15, errors
    # the trend the paper explains (bigger GEMMs, relatively cheaper element-wise work) is reproduced
    assert rows[-1]["predicted"] > rows[3]["predicted"]


def test_korthikanti_2022_mfu_within_15_percent():
    errors = [r["error"] for r in validation.korthikanti_mfu_table()]
    assert max(map(abs, errors)) <= 0.15, errors


def test_estimate_api_names_and_units():
    e = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, "a100", tp=8, pp=8)
    assert e.config["dp"] == 16 and e.num_microbatches == 96
    assert 0 < e.mfu < 1 and 50 < e.tflops_per_gpu < 312 and e.step_time > 0 and e.fits
    assert e.memory_per_gpu == pytest.approx(sum(e.memory.values()))
    assert e.tflops_per_gpu == pytest.approx(plan.hardware_flops(96, 12288, 51200, 2048, 1536, "selective")
                                             / e.step_time / 1024 / 1e12)
    h100 = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, gpu="H100", tp=8, pp=8)
    assert h100.step_time < e.step_time                                    # a faster GPU is faster
    big = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 8, "a100", tp=8, pp=1)
    assert not big.fits and "GB" in big.notes[0]                           # 175B on one node
    assert "comm tp" in e.explain() and "bubble" in e.explain()


@pytest.mark.parametrize("kw, msg", [
    (dict(gpus=100, tp=8, pp=8), "not divisible"),
    (dict(gpus=1024, tp=8, pp=8, dp=4), "leave dp=None"),
    (dict(gpus=1024, tp=8, pp=8, v=5), "divisible by pp\\*v"),
    (dict(gpus=1024, tp=8, pp=8, global_batch=100), "global_batch"),
    (dict(gpus=1024, tp=8, pp=8, gpu="tpu"), "unknown gpu"),
    (dict(gpus=1024, tp=8, pp=8, recompute="most"), "recompute"),
    (dict(gpus=1024, tp=8, pp=8, zero_stage=4), "zero_stage"),
])
def test_estimate_rejects_bad_layouts_clearly(kw, msg):
    args = dict(layers=96, hidden=12288, heads=96, vocab=51200, seq=2048, global_batch=1536, micro_batch=1)
    with pytest.raises(ValueError, match=msg):
        plan.estimate(**{**args, **kw})


def test_user_hardware_can_be_added():
    plan.add_link(plan.Link("my-eth", 12.5e9, 20e-6, "100 GbE"))
    plan.add_gpu(plan.GPU("my-gpu", 100e12, 48e9, 1e12, "pcie5", "my-eth", 4, "test card"))
    e = plan.estimate(24, 2048, 16, 50000, 2048, 64, 1, 8, gpu="my-gpu", tp=2)
    assert e.comm["dp"]["link"] == "my-eth" and e.comm["tp"]["link"] == "pcie5"
    with pytest.raises(ValueError, match="add it first"):
        plan.add_gpu(plan.GPU("bad", 1e12, 1e9, 1e12, "nvlink9", "my-eth"))


# ----------------------------------------------------------------------------- planner and CLI
def test_planner_70b_on_64_h100_fits_ranks_and_explains():
    p = plan.plan("70b", 64, "h100")
    best = p.best
    assert best.fits and best.memory_per_gpu <= 80e9
    times = [e.step_time for e in p.ranked]
    assert times[:10] == sorted(times[:10]) and all(e.fits for e in p.ranked)
    assert best.step_time <= min(times) * (1 + 1e-9)
    text = p.explain()
    for word in ("memory", "params", "activations", "comm tp", "bubble", "runner-up"):
        assert word in text
    c = best.config
    assert c["tp"] * c["pp"] * c["dp"] * c["cp"] == 64 and c["tp"] <= 8


def test_planner_errors_are_clear():
    with pytest.raises(ValueError, match="Use more GPUs"):
        plan.plan("70b", 8, "h100")
    with pytest.raises(ValueError, match="unknown model"):
        plan.plan("70 billion", 64, "h100")
    with pytest.raises(ValueError, match="global batch"):
        plan.plan("70b", 63, "h100")


def test_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--gpus" in capsys.readouterr().out
    assert main(["--model", "7b", "--gpus", "16", "--gpu", "a100", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layout" in out and "TFLOP/s" in out
    assert main(["--model", "70b", "--gpus", "8"]) == 2
    assert "error: no layout" in capsys.readouterr().err
    assert main(["--model", "custom", "--layers", "4"]) == 2


def test_cluster_shape_changes_the_links():
    e8 = plan.plan("13b", 32, "a100", shortlist=2).best
    slow = plan.plan("13b", 32, "a100", gpus_per_node=2, inter_node="ib-hdr", shortlist=2).best
    assert slow.config["tp"] <= 2 and slow.step_time >= e8.step_time
    with pytest.raises(ValueError, match="unknown link"):
        plan.plan("13b", 32, "a100", inter_node="carrier-pigeon")


# ----------------------------------------------------------------------------- modeled clock
def test_retime_prices_recorded_events_with_the_hardware_model():
    from minipar.trace import Event
    g, A = plan.get_gpu("h100"), plan.ASSUMPTIONS
    nv = plan.get_link("nvlink4")
    evs = []
    for r in (0, 1):
        evs += [Event(r, "F", "compute", 0.0, 1.0), Event(r, "B", "compute", 1.0, 3.0),
                Event(r, "all_reduce", "comm", 3.0, 4.0, axis="dp", bytes=1_000_000, wire_bytes=1_000_000.0),
                Event(r, "opt", "compute", 4.0, 4.5)]
    out = plan.retime(evs, "h100", flops={"F": 1e12, "B": 2e12})
    r0 = {e.name: e for e in out if e.rank == 0}
    unit = g.peak_flops * A.compute_efficiency
    assert r0["F"].end - r0["F"].start == pytest.approx(1e12 / unit)
    assert r0["B"].start == pytest.approx(r0["F"].end) and r0["B"].end - r0["B"].start == pytest.approx(2e12 / unit)
    ar = r0["all_reduce"]
    assert ar.end - ar.start == pytest.approx(nv.latency + 1e6 / (nv.bandwidth * A.link_efficiency))
    slow = {e.name: e for e in plan.retime(evs, "h100", flops={"F": 1e12, "B": 2e12}, inter_node_axes=("dp",))
            if e.rank == 0}
    assert slow["all_reduce"].end - slow["all_reduce"].start > ar.end - ar.start      # NIC slower than NVLink
    with pytest.raises(ValueError, match="needs events"):
        plan.retime([], "h100")
