"""The planner: formulas pinned to the papers, the step-time model against published
measurements, the simulator wiring, the search and the command line (its exercise: test_exercises.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import plan
from minipar.plan import validation
from minipar.plan.__main__ import main
from minipar.plan.pipeline import _closed_form, pipeline_makespan
from minipar.plan.topology import alpha_beta  # the one import of the stand-in (swapped at merge)
from minipar.pp.partition import balance_stages, layer_costs, stage_costs
from minipar.validation import ConfigError

s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B layer, as in Korthikanti 2022
sbh = s * b * h


# ----------------------------------------------------------------------------- formulas
def test_num_params_reproduces_megatron_2021_table1_to_a_tenth_of_a_billion():
    for P, heads, hidden, layers, *_ in validation.MEGATRON_2021_TABLE1:
        assert round(plan.num_params(layers, hidden, 51200, 2048) / 1e9, 1) == P
    assert plan.num_params(96, 12288, 51200, 2048) == pytest.approx(174.6e9, rel=1e-3)  # GPT-3


def test_zero_table1_reproduced_to_the_papers_rounding():
    rows = validation.zero_table()
    assert len(rows) == 54 and all(r["match"] for r in rows), [r for r in rows if not r["match"]]
    assert plan.model_state_bytes(7.5e9, 64, 1) / 1e9 == pytest.approx(31.40625)  # printed 31.4
    assert plan.model_state_bytes(1e12, 1024, 3) / 1e9 == pytest.approx(15.625)  # printed 15.6
    # the rounding check itself can fail
    assert not validation.paper_rounding_matches(41.4, 41.3) and not validation.paper_rounding_matches(
        7.6, 7.5
    )


@pytest.mark.parametrize(
    "tp_, sp, rc, per_sbh",
    [
        (1, False, None, 34 + 5 * a * s / h),  # 34 + 80 = 114
        (t, False, None, 10 + 24 / t + 5 * a * s / (h * t)),
        (t, True, None, 34 / t + 5 * a * s / (h * t)),
        (t, False, "selective", 10 + 24 / t),
        (t, True, "selective", 34 / t),
        (t, False, "full", 2),
        (t, True, "full", 2 / t),
    ],
)
def test_activation_bytes_match_korthikanti_table2(tp_, sp, rc, per_sbh):
    got = plan.activation_bytes_per_layer(s, b, h, a, tp=tp_, sequence_parallel=sp, recompute=rc)
    assert got == pytest.approx(sbh * per_sbh, rel=1e-12)
    assert plan.activation_bytes_per_layer(s, b, h, a, tp_, sp, rc, bytes_per_value=4) == pytest.approx(
        2 * got
    )


def test_selective_recompute_saves_what_korthikanti_reports():
    assert validation.selective_recompute_savings(2048, 12288, 96) == pytest.approx(0.70, abs=0.005)  # GPT-3
    assert validation.selective_recompute_savings(2048, 20480, 128) == pytest.approx(
        0.65, abs=0.005
    )  # MT-NLG


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([1, 2, 4, 8]),
    st.integers(1, 8),
    st.sampled_from([512, 2048, 8192]),
    st.sampled_from([(32, 4096), (64, 8192), (96, 12288)]),
    st.booleans(),
)
def test_memory_orderings_hold_for_any_layout(t_, b_, s_, ah, sp):
    a_, h_ = ah
    none, sel, full = (
        plan.activation_bytes_per_layer(s_, b_, h_, a_, t_, sp, rc) for rc in (None, "selective", "full")
    )
    assert none > sel > full > 0
    assert plan.activation_bytes_per_layer(s_, b_, h_, a_, t_, True, None) <= plan.activation_bytes_per_layer(
        s_, b_, h_, a_, t_, False, None
    )  # SP never costs memory
    states = [plan.model_state_bytes(1e9 * b_, 8, z) for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[3] == pytest.approx(states[0] / 8)


def test_flops_formulas():
    B, l, V = 1536, 96, 51200
    base = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    assert plan.model_flops(l, h, V, s, B) == pytest.approx(base)
    assert plan.hardware_flops(l, h, V, s, B, "full") == pytest.approx(
        96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    )  # Narayanan 2021 Eq. 3
    assert plan.hardware_flops(l, h, V, s, B, "selective") - base == pytest.approx(4 * B * s**2 * l * h)
    assert plan.hardware_flops(l, h, V, s, B, None) == base
    assert plan.mfu(312e12 * 8, 2.0, 8, 312e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recompute"):
        plan.hardware_flops(l, h, V, s, B, "some")


def test_context_parallel_splits_tokens_but_scores_span_every_key():
    one = {rc: plan.activation_bytes_per_layer(32768, 1, 8192, 64, 8, True, rc) for rc in (None, "selective")}
    two = {
        rc: plan.context_parallel_layer_bytes(32768, 2, 1, 8192, 64, 8, True, rc)
        for rc in (None, "selective")
    }
    assert two["selective"] == pytest.approx(one["selective"] / 2)  # per-token tensors: halved
    assert two[None] == pytest.approx(one[None] / 2)  # scores (s/c)·s: halved too, not quartered
    e1 = plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=8)
    ring = plan.estimate(80, 8192, 64, 32000, 32768, 128, 1, 64, "h100", tp=8, pp=4, cp=2)
    # the same work on twice the GPUs per stage: each stage's compute per micro-batch halves
    assert ring.stages[0]["compute_f"] == pytest.approx(e1.stages[0]["compute_f"], rel=0.05)
    assert ring.comm["cp"]["count"] > 0 and e1.comm["cp"]["count"] == 0
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
    assert c1["dp"]["wire"] == pytest.approx(2 * (k - 1) / k * 2 * psi)  # ring all-reduce of bf16 grads
    c3 = plan.comm_bytes(24, 1024, 2048, 1, 1, psi, dp=k, zero_stage=3)
    assert c3["dp"]["wire"] / c1["dp"]["wire"] == pytest.approx(1.5)  # ZeRO: 3Ψ vs 2Ψ
    c = plan.comm_bytes(24, 1024, 2048, 2, 4, psi, tp=4, pp=2, v=2, sequence_parallel=True, recompute="full")
    act = 2048 * 2 * 1024 * 2
    assert c["tp"]["count"] == 6 * 12 * 4 and c["tp"]["payload"] == pytest.approx(6 * 12 * 4 * act)
    assert c["pp"]["payload"] == pytest.approx(2 * 2 * 4 * act / 4)  # v·m sends each way, /t with SP
    e = plan.comm_bytes(24, 1024, 2048, 1, 1, psi, ep=8, moe_layers=24, top_k=2)
    assert e["ep"]["wire"] == pytest.approx(4 * 24 * 2 * 2048 * 1024 * 2 * 7 / 8)


# ----------------------------------------------------------------------------- pipeline ↔ simulator
def test_pipeline_uses_the_simulator_and_agrees_with_closed_forms():
    assert plan.simulator_available()
    for sched, p, m, v in [
        ("gpipe", 4, 8, 1),
        ("1f1b", 8, 100, 1),
        ("interleaved_1f1b", 4, 16, 2),
        ("zb_h1", 4, 8, 1),
    ]:
        sim, _ = pipeline_makespan(sched, p, m, v, 1.0, 2.0)
        k = v
        assert sim == pytest.approx(_closed_form(sched, p, m, v, [1.0 / k] * p * v, [2.0 / k] * p * v, 0.0))
        assert pipeline_makespan(sched, p, m, v, 1.0, 2.0, use_simulator=False)[0] == pytest.approx(sim)


def test_pipeline_extrapolation_equals_a_full_simulation_with_communication():
    from minipar.pp import build_schedule, simulate

    full = simulate(build_schedule("interleaved_1f1b", 8, 64, 2), t_f=1.0, t_b=3.0, t_comm=0.2).makespan
    got, bubble = pipeline_makespan("interleaved", 8, 64, 2, 1.0, 3.0, 0.2)
    assert (
        got == pytest.approx(full, rel=1e-9) and got > pipeline_makespan("interleaved", 8, 64, 2, 1.0, 3.0)[0]
    )
    assert 0 < bubble < 1
    for sched in ("zb_h1", "dualpipev", "dualpipe"):  # their steady state, extended from 2p and 4p
        full = simulate(build_schedule(sched, 4, 40), t_f=1.0, t_b=2.0, t_comm=0.1).makespan
        assert pipeline_makespan(sched, 4, 40, 1, 1.0, 2.0, 0.1)[0] == pytest.approx(full, rel=1e-9)


def test_dualpipe_pairs_are_priced_by_the_simulators_t_fb():
    """DualPipe(V)'s F&B pairs: the planner's `t_fb_ratio` is pp.simulate's t_fb in units of t_f + t_b."""
    from minipar.pp import build_schedule, simulate

    for sched, m in (("dualpipev", 16), ("dualpipe", 16)):
        for r in (1.0, 0.8, 2 / 3):
            want = simulate(build_schedule(sched, 4, m), t_f=1.0, t_b=2.0, t_fb=r * 3.0).makespan
            assert pipeline_makespan(sched, 4, m, 1, 1.0, 2.0, t_fb_ratio=r)[0] == pytest.approx(
                want, rel=1e-9
            )
    assert (
        pipeline_makespan("dualpipev", 4, 16, 1, 1.0, 2.0, t_fb_ratio=0.7)[0]
        < pipeline_makespan("dualpipev", 4, 16, 1, 1.0, 2.0)[0]
    )


def test_uneven_stages_price_the_slowest_stage_on_the_simulator():
    """A stage with one layer more sets the pace: 1F1B's makespan with stage times T_s lies between
    m·max T (the slowest stage never idles) and the closed form (m - 1)·max T + sum T, above what the
    mean stage would give; the steady-state line equals simulating every micro-batch."""
    from minipar.plan.pipeline import _simulated
    from minipar.pp import build_schedule, simulate

    t_f, t_b = [1.0, 1.0, 1.5, 1.0], [2.0, 2.0, 3.0, 2.0]
    got, _ = pipeline_makespan("1f1b", 4, 12, 1, t_f, t_b)
    T = [f + b for f, b in zip(t_f, t_b)]
    assert 12 * max(T) <= got <= 11 * max(T) + sum(T)
    assert got == pytest.approx(
        _simulated("1f1b", 4, 12, 1, tuple(x / 4.5 for x in t_f), tuple(x / 4.5 for x in t_b), 0.0, 1.0)
        * 4.5,
        rel=1e-9,
    )
    assert got > simulate(build_schedule("1f1b", 4, 12), t_f=1.125, t_b=2.25).makespan  # the mean stage


# ----------------------------------------------------------------------------- step-time model vs papers
@pytest.fixture(scope="module")
def tables():
    """Every public row, computed once (each estimate simulates its pipeline)."""
    rows = validation.public_tables()
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    return by


def _errors(rows):
    return [abs(r["error"]) for r in rows]


def test_megatron_2021_table1_within_6_percent_mean(tables):
    rows = tables["Narayanan 2021 Table 1"]
    e = _errors(rows)
    assert len(rows) == 10 and sum(e) / len(e) <= 0.06 and max(e) <= 0.10, e
    # the trend the paper explains (bigger GEMMs, relatively cheaper element-wise work) is reproduced
    assert rows[-1]["predicted"] > rows[3]["predicted"]


def test_megatron_2021_table2_ptdp_and_the_trend_with_gpus(tables):
    """PTD-P at a fixed batch: more GPUs, fewer micro-batches per pipeline, a larger bubble, lower
    TFLOP/s. The published decline is reproduced row by row, and its size (slope) within 5 points."""
    rows = [r for r in tables["Narayanan 2021 Table 2"] if r["name"].startswith("PTD-P")]
    assert max(_errors(rows)) <= 0.10, _errors(rows)
    for model in ("174.6B", "529.6B"):
        rs = [r for r in rows if model in r["name"]]
        pred, pub = [r["predicted"] for r in rs], [r["published"] for r in rs]
        assert pred == sorted(pred, reverse=True) and pub == sorted(pub, reverse=True)
        assert abs((pred[-1] / pred[0]) - (pub[-1] / pub[0])) <= 0.05


def test_zero3_without_model_parallelism_is_a_known_miss(tables):
    """DeepSpeed ZeRO-3 (2021) reached 44-144 TFLOP/s; the model, pricing NCCL's hierarchical
    bandwidth (nccl-tests bus bandwidth), says the network allowed far more. Kept visible, not tuned."""
    rows = [r for r in tables["Narayanan 2021 Table 2"] if r["name"].startswith("ZeRO-3")]
    assert len(rows) == 6 and all(r["error"] > 0.3 for r in rows)
    for model in ("174.6B", "529.6B"):  # the direction of the trend still holds
        pred = [r["predicted"] for r in rows if model in r["name"]]
        assert pred == sorted(pred, reverse=True)


def test_korthikanti_2022_table5_iteration_times_and_the_recompute_slope(tables):
    rows = tables["Korthikanti 2022 Table 5"]
    assert max(_errors(rows)) <= 0.10, _errors(rows)
    sel = [r for r in rows if "selective" in r["name"]]
    full = [r for r in rows if "full" in r["name"]]
    for s_, f_ in zip(sel, full):  # full recompute costs what the paper measured, row by row
        assert f_["predicted"] > s_["predicted"]
        assert f_["predicted"] / s_["predicted"] == pytest.approx(f_["published"] / s_["published"], abs=0.08)
    pred, pub = [r["predicted"] for r in sel], [r["published"] for r in sel]
    assert sorted(range(4), key=pred.__getitem__) == sorted(range(4), key=pub.__getitem__)


def test_korthikanti_2022_mfu_and_bloom_and_llama3(tables):
    kor = tables["Korthikanti 2022 / Megatron README"]
    assert max(_errors(kor)) <= 0.08, _errors(kor)
    assert kor[0]["predicted"] < min(r["predicted"] for r in kor[1:])  # 22B, no pipeline: the lowest MFU
    bloom = tables["BLOOM-176B (BigScience 2022)"]
    assert _errors(bloom)[0] <= 0.15
    llama = tables["Llama 3 (Dubey 2024) Table 4"]
    assert max(_errors(llama)) <= 0.10, _errors(llama)
    assert llama[0]["predicted"] > llama[1]["predicted"]  # twice the GPUs, half the micro-batches
    assert llama[0]["estimate"].config["stage_layers"][:2] == [1, 2]  # 126 layers on 64 virtual stages


def test_nemotron4_340b_on_h100_iteration_times(tables):
    """A larger batch on more GPUs: the same micro-batches per pipeline (10.3 s twice), then 1.5x the
    batch on 2x the GPUs (8.0 s). Predicted row by row, and the ratio between them."""
    rows = tables["Nemotron-4 340B (NVIDIA 2024) Table 2"]
    assert max(_errors(rows)) <= 0.08, _errors(rows)
    t = [r["predicted"] for r in rows]
    assert t[0] == pytest.approx(t[1], rel=0.02) and t[2] / t[1] == pytest.approx(8.0 / 10.3, abs=0.03)


def test_every_public_row_mean_and_worst(tables):
    rows = [r for rs in tables.values() for r in rs if not r["name"].startswith("ZeRO-3")]
    s = validation.summary(rows)
    # measured 4.25% and 9.97% (README): the bounds sit just above, so a change that worsens the fit fails
    assert s["rows"] == 35 and s["mean"] <= 0.045 and s["worst"] <= 0.105, s


def test_moe_rows_are_over_predicted_as_the_readme_says():
    """The known miss, kept honest: the planner models MoE's all-to-all and expert GEMMs as if
    dense-efficient, so it predicts 29-144% more throughput than Megatron-Bridge published (README)."""
    rows = validation.megatron_bridge_moe()
    assert len(rows) == 4 and all(0.25 <= r["error"] <= 1.5 for r in rows), [
        (r["name"], r["error"]) for r in rows
    ]


def test_estimate_api_names_and_units():
    e = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, "a100", tp=8, pp=8)
    assert e.config["dp"] == 16 and e.num_microbatches == 96
    assert 0 < e.mfu < 1 and 50 < e.tflops_per_gpu < 312 and e.step_time > 0 and e.fits
    assert e.memory_per_gpu == pytest.approx(sum(e.memory.values()))
    assert e.tflops_per_gpu == pytest.approx(
        plan.model_flops(96, 12288, 51200, 2048, 1536)  # flash: no extra
        / e.step_time
        / 1024
        / 1e12
    )
    old = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, "a100", tp=8, pp=8, flash_attention=False)
    assert old.tflops_per_gpu == pytest.approx(
        plan.hardware_flops(96, 12288, 51200, 2048, 1536, "selective") / old.step_time / 1024 / 1e12
    )
    h100 = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, gpu="H100", tp=8, pp=8)
    assert h100.step_time < e.step_time  # a faster GPU is faster
    big = plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 8, "a100", tp=8, pp=1)
    assert not big.fits and "GB" in big.notes[0]  # 175B on one node
    assert "comm tp" in e.explain() and "bubble" in e.explain()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(gpus=100, tp=8, pp=8), "not divisible"),
        (dict(gpus=1024, tp=8, pp=8, dp=4), "leave dp=None"),
        (dict(gpus=1024, tp=8, pp=8, v=13), "cannot fill"),
        (dict(gpus=1024, tp=8, pp=8, stage_layers=[12] * 7 + [11]), "stage_layers"),
        (dict(gpus=1024, tp=8, pp=8, ep=2), "experts"),
        (dict(gpus=1024, tp=8, pp=8, schedule="zb-h2"), "schedule"),
        (dict(gpus=1024, tp=8, pp=8, global_batch=100), "global_batch"),
        (dict(gpus=1024, tp=8, pp=8, gpu="tpu"), "unknown gpu"),
        (dict(gpus=1024, tp=8, pp=8, recompute="most"), "recompute"),
        (dict(gpus=1024, tp=8, pp=8, zero_stage=4), "zero_stage"),
    ],
)
def test_estimate_rejects_bad_layouts_clearly(kw, msg):
    args = dict(layers=96, hidden=12288, heads=96, vocab=51200, seq=2048, global_batch=1536, micro_batch=1)
    with pytest.raises(ValueError, match=msg):
        plan.estimate(**{**args, **kw})


def test_user_hardware_can_be_added():
    plan.add_link(plan.Link("my-eth", 12.5e9, 20e-6, "100 GbE"))
    plan.add_gpu(plan.GPU("my-gpu", 100e12, 48e9, 1e12, "pcie5", "my-eth", 4, "test card"))
    e = plan.estimate(24, 2048, 16, 50000, 2048, 64, 1, 8, gpu="my-gpu", tp=2)
    assert "my-eth" in e.comm["dp"]["link"] and "pcie5" in e.comm["tp"]["link"]
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
        plan.plan("70b", 67, "h100")


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
    kw = dict(shortlist=2, micro_batches=(1,), schedules=("1f1b",), zero_stages=(1,))
    e8 = plan.plan("13b", 32, "a100", **kw).best
    slow = plan.plan("13b", 32, "a100", gpus_per_node=2, inter_node="ib-hdr", **kw).best
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
        evs += [
            Event(r, "F", "compute", 0.0, 1.0),
            Event(r, "B", "compute", 1.0, 3.0),
            Event(r, "all_reduce", "comm", 3.0, 4.0, axis="dp", bytes=1_000_000, wire_bytes=1_000_000.0),
            Event(r, "opt", "compute", 4.0, 4.5),
        ]
    out = plan.retime(evs, "h100", flops={"F": 1e12, "B": 2e12})
    r0 = {e.name: e for e in out if e.rank == 0}
    unit = g.peak_flops * g.matmul_efficiency * A.kernel_efficiency
    assert r0["F"].end - r0["F"].start == pytest.approx(1e12 / unit)
    assert r0["B"].start == pytest.approx(r0["F"].end) and r0["B"].end - r0["B"].start == pytest.approx(
        2e12 / unit
    )
    ar = r0["all_reduce"]
    assert ar.end - ar.start == pytest.approx(nv.latency + 1e6 / (nv.bandwidth * nv.efficiency))
    slow = {
        e.name: e
        for e in plan.retime(evs, "h100", flops={"F": 1e12, "B": 2e12}, inter_node_axes=("dp",))
        if e.rank == 0
    }
    assert slow["all_reduce"].end - slow["all_reduce"].start > ar.end - ar.start  # NIC slower than NVLink
    with pytest.raises(ValueError, match="needs events"):
        plan.retime([], "h100")


# ----------------------------------------------------------------------------- stage partition
def _brute(costs, p):
    """Every composition of len(costs) into p parts >= 1: (best max, best sum of squares)."""
    import itertools

    L, best = len(costs), None
    for cuts in itertools.combinations(range(1, L), p - 1):
        parts = [b - a for a, b in zip((0,) + cuts, cuts + (L,))]
        sc = stage_costs(costs, parts)
        key = (round(max(sc), 9), round(sum(c * c for c in sc), 6))
        best = key if best is None or key < best else best
    return best


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=9), st.integers(1, 9))
def test_balance_stages_equals_brute_force(costs, p):
    if p > len(costs):
        with pytest.raises(ValueError, match="cannot fill"):
            balance_stages(costs, p)
        return
    got = balance_stages(costs, p)
    assert len(got) == p and sum(got) == len(costs) and min(got) >= 1
    sc = stage_costs(costs, got)
    assert (round(max(sc), 9), round(sum(c * c for c in sc), 6)) == _brute(costs, p)


def test_balance_stages_gives_llama3_405b_its_published_partition():
    c = layer_costs(126, 16384, 128256, 8192, ffn_hidden=53248, kv_heads=8, heads=128, gated_mlp=True)
    assert balance_stages(c, 16) == [7] + [8] * 14 + [7]  # Dubey et al. 2024, Sec. 3.3.2
    assert balance_stages([1.0] * 12, 4) == [3, 3, 3, 3] and balance_stages([1.0] * 10, 4) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="num_stages"):
        balance_stages([1.0], 0)


# ----------------------------------------------------------------------------- collectives and topology
def test_alpha_beta_counts_are_the_textbook_ones():
    S = 1024.0
    assert alpha_beta("ring", "all_reduce", 8, S) == (14, 2 * 7 / 8 * S)
    assert alpha_beta("tree", "all_reduce", 8, S) == (6, 6 * S)
    assert alpha_beta("halving_doubling", "all_reduce", 8, S) == (6, 2 * 7 / 8 * S)
    assert (
        alpha_beta("ring", "all_gather", 8, S) == alpha_beta("ring", "reduce_scatter", 8, S) == (7, 7 / 8 * S)
    )
    assert alpha_beta("pairwise", "all_to_all", 8, S) == (7, 7 / 8 * S)
    assert alpha_beta("ring", "all_reduce", 1, S) == (0, 0.0)


def test_ring_and_tree_cross_over_where_the_alpha_beta_model_says():
    """Ring: 2(n-1)α + 2(n-1)/n·S/B; tree: 2L·α + 2L·S/B with L = ceil(log2 n). They are equal at
    S* = 2α(n-1-L) / ((2L - 2(n-1)/n) / B); below it the tree wins (fewer steps), above it the ring."""
    topo = plan.get_topology("dgx-h100")
    nv = topo.intra
    n, L = 8, 3
    B, a = nv.bandwidth * nv.efficiency, nv.latency
    s_star = 2 * a * (n - 1 - L) / ((2 * L - 2 * (n - 1) / n) / B)
    small, how_small = plan.collective_time("all_reduce", s_star / 4, n, 1, topo)
    large, how_large = plan.collective_time("all_reduce", s_star * 4, n, 1, topo)
    assert how_small.startswith("tree") and how_large.startswith("ring")
    ring = 2 * (n - 1) * a + 2 * (n - 1) / n * s_star / B
    assert plan.collective_time("all_reduce", s_star, n, 1, topo)[0] == pytest.approx(ring)


def test_topologies_price_the_fabric_nvl72_and_sharp():
    gb = 1e9
    ib = plan.collective_time("all_reduce", gb, 64, 8, "dgx-h100")[0]  # dp across 8-GPU nodes
    roce = plan.collective_time("all_reduce", gb, 64, 8, "h100-roce")[0]
    sharp = plan.collective_time("all_reduce", gb, 64, 8, "dgx-h100-sharp")[0]
    nvl = plan.collective_time("all_reduce", gb, 64, 1, "gb200-nvl72")
    assert sharp < ib < roce  # in-network reduction; RoCE's lower efficiency
    assert "nvlink5" in nvl[1] and nvl[0] < ib / 10  # 64 GPUs inside one NVLink domain
    hier = plan.collective_time("all_reduce", gb, 16, 1, "dgx-h100")
    assert hier[1].startswith("hierarchical")
    assert plan.collective_time("all_reduce", gb, 8, 1, "dgx-h100")[0] < hier[0]


# ----------------------------------------------------------------------------- architectures
def test_presets_have_their_published_sizes():
    want = {
        "gpt3-175b": (174.6, 174.6),
        "llama3-8b": (8.0, 8.0),
        "llama3-70b": (70.6, 70.6),
        "llama3-405b": (405.9, 405.9),
        "mixtral-8x7b": (46.7, 12.9),
        "deepseek-v3": (671.0, 37.6),
    }
    for name, (total, active) in want.items():
        M = plan.MODELS[name]
        assert round(M.params / 1e9, 1) == total and round(M.active_params / 1e9, 1) == active, name
    gpt = plan.MODELS["gpt3-175b"]
    assert gpt.model_flops(1536) == pytest.approx(plan.model_flops(96, 12288, 51200, 2048, 1536))
    for rc, sp in [(None, False), (None, True), ("selective", True), ("full", False)]:
        assert gpt.layer_activation_bytes(2048, 1, False, 8, sp, rc, flash=False) == pytest.approx(
            plan.activation_bytes_per_layer(2048, 1, 12288, 96, 8, sp, rc)
        )


def test_llama3_405b_on_126_layers_and_16_stages():
    kw = plan.MODELS["llama3-405b"].arch_kwargs()
    e = plan.estimate(
        126,
        16384,
        128,
        128256,
        8192,
        2048,
        1,
        8192,
        "h100",
        tp=8,
        pp=16,
        recompute=None,
        topology="h100-roce",
        **kw,
    )
    assert e.config["stage_layers"] == [7] + [8] * 14 + [7] and e.config["dp"] == 64
    uneven = plan.estimate(
        126,
        16384,
        128,
        128256,
        8192,
        2048,
        1,
        8192,
        "h100",
        tp=8,
        pp=16,
        recompute=None,
        topology="h100-roce",
        stage_layers=[6] + [8] * 14 + [8],
        **kw,
    )
    assert uneven.step_time > e.step_time  # the head on a full last stage slows the pipe
    assert 0.3 < e.mfu < 0.6 and e.stages[-1]["t_f"] > e.stages[1]["t_f"] * 7 / 8


def test_moe_deepseek_v3_layout_and_dualpipe_hides_the_all_to_all():
    M = plan.MODELS["deepseek-v3"]
    kw = dict(gpu="h800", tp=1, pp=16, ep=64, zero_stage=1, recompute=None, **M.arch_kwargs())
    args = (M.layers, M.hidden, M.heads, M.vocab, M.seq, M.global_batch, 1, 2048)
    dual = plan.estimate(*args, schedule="dualpipe", **kw)
    flat = plan.estimate(*args, schedule="1f1b", **kw)
    assert dual.config["dp"] == 128 and dual.comm["ep"]["count"] > 0 and "ib-ndr" in dual.comm["ep"]["link"]
    assert dual.step_time < 0.7 * flat.step_time  # F&B pairs hide the all-to-all and halve the bubble
    assert dual.memory["params"] > flat.memory["params"]  # DualPipe keeps two copies of the parameters
    ep8 = plan.estimate(*args, schedule="1f1b", **{**kw, "ep": 8})
    assert "nvlink" in ep8.comm["ep"]["link"] and ep8.memory["params"] > flat.memory["params"]


def test_estimate_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        plan.estimate(0, 12288, 96, 51200, 2048, 1536, -1, 1024, "tpu", tp=8, pp=8, zero_stage=5)
    text = str(e.value)
    for word in ("layers=0", "micro_batch=-1", "zero_stage=5", "unknown gpu"):
        assert word in text


def test_planner_finds_layouts_no_pp_divides():
    M = plan.ModelShape(
        30,
        2048,
        16,
        32000,
        2048,
        256,
        "a 30-layer model",
        kv_heads=4,
        gated_mlp=True,
        ffn_hidden=5632,
        tied_embeddings=False,
        position_embeddings=False,
        dropout=False,
    )
    p = plan.plan(M, 32, "h100", micro_batches=(1,), schedules=("1f1b",), shortlist=2)
    pps = {e.config["pp"] for e in p.ranked + p.more}
    assert any(30 % x for x in pps)  # e.g. pp = 4 or 8 on 30 layers
    e = next(e for e in p.ranked + p.more if 30 % e.config["pp"])
    assert sum(e.config["stage_layers"]) == 30


def test_command_line_refuses_bad_input_one_line_each(capsys):
    assert main(["--gpus", "0", "--gpu", "nonexistent", "--model", "custom", "--layers", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 4 and all(line.startswith("error: ") for line in err) and "Traceback" not in "".join(err)
    )
    assert main(["--gpus", "x"]) == 2 and "whole number" in capsys.readouterr().err


def test_offload_places_the_optimizer_states_on_the_host_or_its_nvme_drives():
    """ZeRO-Offload / ZeRO-Infinity in the estimate: the states leave the GPU's memory; the step pays
    PCIe and a CPU Adam, and NVMe adds 16 bytes per parameter each way (the bytes tests/test_nvme.py
    measures on the real NVMeOptimizer) at the drives' bandwidth."""
    kw = dict(
        tp=8,
        pp=1,
        zero_stage=3,
        kv_heads=8,
        ffn_hidden=28672,
        gated_mlp=True,
        tied_embeddings=False,
        position_embeddings=False,
        dropout=False,
    )
    none, cpu, nvme = (
        plan.estimate(80, 8192, 64, 32000, 4096, 512, 1, 64, "h100", offload=o, **kw)
        for o in ("none", "cpu", "nvme")
    )
    assert cpu.memory["optimizer"] == nvme.memory["optimizer"] == 0 < none.memory["optimizer"]
    assert none.step_time < cpu.step_time < nvme.step_time
    link = plan.get_link("nvme")
    params = (nvme.time["optimizer"] - cpu.time["optimizer"]) * link.bandwidth * link.efficiency / 32
    psi_local = none.config["params"] / (8 * 8)  # ZeRO-3 over dp = 8 of each tp = 8 slice
    assert params == pytest.approx(psi_local, rel=0.02)
    with pytest.raises(ValueError, match="offload='disk'"):
        plan.estimate(80, 8192, 64, 32000, 4096, 512, 1, 64, "h100", offload="disk", **kw)
