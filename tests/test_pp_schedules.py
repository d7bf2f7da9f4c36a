"""Schedules, validator and simulator against the papers' closed forms.

Costs in unit time: t_f = 1, t_b = 2 (full backward = I + W with t_w = 1), so F = I = W,
the assumption under which the Zero Bubble and DeepSeek-V3 tables are stated."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import sim
from minipar.pp import (
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    build_schedule,
    lower,
    parse_action,
    simulate,
    validate,
)


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 16), (3, 7)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_1f1b_closed_form(name, p, m):
    """GPipe (Huang et al. 2019, Sec. 2.2) and 1F1B (Narayanan et al. 2021, Sec. 2.2.1):
    makespan = (m + p - 1)(t_f + t_b); bubble = (p-1)/(m+p-1) of the makespan = (p-1)/m of the ideal."""
    for t_f, t_b in [(1.0, 2.0), (1.0, 3.0), (0.7, 1.1)]:
        r = simulate(build_schedule(name, p, m), t_f, t_b)
        assert r.makespan == pytest.approx((m + p - 1) * (t_f + t_b))
        assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
        ideal = m * (t_f + t_b)
        assert (r.makespan - ideal) / ideal == pytest.approx((p - 1) / m)
    peak = simulate(build_schedule(name, p, m)).peak_activations
    # GPipe stashes all m micro-batches; 1F1B at most p - r on rank r (Narayanan et al. 2021, Sec. 2.2.1)
    assert peak == ({r: m for r in range(p)} if name == "gpipe" else {r: min(p - r, m) for r in range(p)})


def test_naive_is_sequential():
    r = simulate(build_schedule("naive", 4, 3), 1.0, 2.0)
    assert r.makespan == pytest.approx(3 * 4 * 3.0)  # m p (t_f + t_b): no overlap at all
    assert r.bubble_fraction == pytest.approx(3 / 4)  # (p-1)/p


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (3, 6, 3)])
def test_interleaved_closed_form(p, m, v):
    """Megatron-LM interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2, Fig. 4):
    bubble time (p-1)(t_f+t_b)/v, i.e. bubble/ideal = (p-1)/(v m); makespan = (m + (p-1)/v)(t_f+t_b)."""
    r = simulate(build_schedule("interleaved_1f1b", p, m, v), 1.0, 2.0)
    assert r.makespan == pytest.approx((m + (p - 1) / v) * 3.0)
    assert (r.makespan - 3.0 * m) / (3.0 * m) == pytest.approx((p - 1) / (v * m))


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16), (6, 12)])
def test_zero_bubble(p, m):
    """Zero Bubble (Qi et al. 2024, Table 1, T_B = I time): 1F1B idles (p-1)(T_F+T_B+T_W) per rank,
    ZB-H1 (p-1)(T_F+T_B-T_W) with the same pM_B memory, ZB-H2 (p-1)(T_F+T_B-2T_W) = 0 inside each
    rank's span with (2p-1)M_B; its only idle is the warm-up stagger (p-1)T_F that the paper's
    parallelogram overlaps with the next iteration."""
    one = simulate(build_schedule("1f1b", p, m), 1.0, 2.0, 1.0)
    h1 = simulate(build_schedule("zb_h1", p, m), 1.0, 2.0, 1.0)
    h2 = simulate(build_schedule("zb_h2", p, m), 1.0, 2.0, 1.0)
    for r in range(p):
        assert one.makespan - one.busy[r] == pytest.approx((p - 1) * 3)
        assert h1.makespan - h1.busy[r] == pytest.approx((p - 1) * 1)  # = 1/3 of 1F1B
        assert h1.peak_activations[r] == one.peak_activations[r] == p - r
        assert h2.span[r] - h2.busy[r] == pytest.approx(0.0)
    assert h2.makespan == pytest.approx(3 * m + (p - 1))
    if m >= 2 * p - 1:
        assert h2.peak_activations[0] == 2 * p - 1


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_zbv(p, m):
    """ZB-V (Qi et al. 2024, Sec. 6): zero bubble inside each rank's span when T_F=T_B=T_W, and peak
    memory pM_B = 2p half-size chunks, the same as 1F1B."""
    r = simulate(build_schedule("zbv", p, m), 1.0, 2.0, 1.0)
    assert all(r.span[q] - r.busy[q] == pytest.approx(0.0) for q in range(p))
    assert max(r.peak_activations.values()) == 2 * p
    assert r.makespan == pytest.approx(3 * m + (p - 1) * 0.5)  # only the half-chunk stagger


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (6, 12), (8, 16), (8, 32)])
@pytest.mark.parametrize("t_fb", [None, 2.0, 2.5])
def test_dualpipe(p, m, t_fb):
    """DeepSeek-V3 report (2024), Table 2 (and github.com/deepseek-ai/DualPipe): bubble
    (PP/2-1)(F&B+B-3W) with 2x parameters and PP+1 activations, F, B, W the costs of one chunk and
    F&B of an overlapped forward+backward pair. DualPipe: PP = p ranks, a chunk is a rank's stage.
    DualPipeV: PP = 2p stages on p devices, a chunk is half a device's layers.
    The bubble is the most any rank idles over the makespan; with no overlap gain (F&B = F+B)
    every rank idles exactly that much."""
    for name, PP, c in (("dualpipe", p, 1.0), ("dualpipev", 2 * p, 0.5)):
        r = simulate(build_schedule(name, p, m), 1.0, 2.0, 1.0, t_fb=t_fb)
        B, W, FB = 2.0 * c, 1.0 * c, (3.0 if t_fb is None else t_fb) * c
        table = (PP / 2 - 1) * (FB + B - 3 * W)
        idle = [r.makespan - r.busy[q] for q in range(p)]
        assert max(idle) == pytest.approx(table), name
        if t_fb is None:
            assert idle == pytest.approx([table] * p), name
        assert max(r.peak_activations.values()) == PP + 1, name
    s = build_schedule("dualpipe", p, m)
    assert len(s.stages_of(0)) == 2 and s.part[s.stages_of(0)[0]] != s.part[s.stages_of(0)[1]]  # 2x params


def test_dualpipe_pairs_start_together():
    """The F of an F&B pair waits for its partner's gradient; listed serially without the pairing
    (a plain F then B) the same order idles less: (p/2-1)(F+B-2W), below the table."""
    s = build_schedule("dualpipe", 4, 8)
    r = simulate(s, 1.0, 2.0, 1.0)
    for f, b in s.overlapped.items():
        assert r.times[f][0] < r.times[b][0] and r.times[f][1] == r.times[b][0]
    serial = simulate(Schedule(**{**vars(s), "overlapped": {}}), 1.0, 2.0, 1.0)
    assert [serial.makespan - serial.busy[q] for q in range(4)] == pytest.approx([1.0] * 4)
    with pytest.raises(ValueError, match="max\\(t_f, t_b\\)"):
        simulate(s, 1.0, 2.0, 1.0, t_fb=1.5)


def test_t_comm_adds_hops():
    # Each of GPipe's 2(p-1) critical-path hops (down in F, up in B) pays one transfer.
    p, m = 4, 4
    r = simulate(build_schedule("gpipe", p, m), 1.0, 2.0, t_comm=0.25)
    assert r.makespan == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * 0.25)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (3, 6, 3)])
def test_interleaved_warmup_hides_the_transfers_and_bounds_the_activations(p, m, v):
    """Megatron-LM's interleaved warm-up, (v-1)p + 2(p-1-r) forwards on rank r (its schedules.py): the
    2(p-1-r) covers the round trip to the last rank and back, so with a transfer time t_comm (small against
    t_f) only the fill and the drain pay it, once per hop along the pv - 1 chunk boundaries each way; and rank
    r holds at most warm-up + 1 micro-batches' activations. A shorter warm-up stalls each steady-state
    backward on its transfer; a longer one holds more activations for nothing."""
    t_comm = 0.25
    r = simulate(build_schedule("interleaved_1f1b", p, m, v), 1.0, 2.0, t_comm=t_comm)
    assert r.makespan == pytest.approx((m + (p - 1) / v) * 3.0 + 2 * (p * v - 1) * t_comm)
    assert r.peak_activations == {q: min((v - 1) * p + 2 * (p - 1 - q) + 1, m * v) for q in range(p)}


@pytest.mark.parametrize("name", SCHEDULES)
@settings(max_examples=12, deadline=None)
@given(data=st.data(), p=st.integers(1, 8), m=st.integers(1, 32), v=st.integers(1, 4))
def test_every_generator_validates(name, data, p, m, v):
    """Property over p <= 8, m <= 32, v <= 4: whatever a generator accepts is complete, ordered and its
    lowered send/recv program cannot deadlock; what it rejects, it rejects with a ValueError."""
    if name != "interleaved_1f1b" and data.draw(st.booleans()):
        v = 1  # mostly draw configurations the generator accepts
    if name == "interleaved_1f1b" and data.draw(st.booleans()):
        m = max(p, m - m % p)
    if name in ("dualpipe", "dualpipev") and 2 * p <= 32 and data.draw(st.booleans()):
        m = data.draw(st.integers(p, 16)) * 2
        p = p + p % 2 if name == "dualpipe" and 2 * (p + p % 2) <= m else p
    try:
        s = build_schedule(name, p, m, v)
    except ValueError as e:
        assert str(e)
        return
    lowered = validate(s)
    assert {str(a) for acts in s.actions.values() for a in acts} == {
        str(a) for acts in lowered.values() for a in acts if a.is_compute
    }


def _sched(actions, p=2, m=1):
    return Schedule("custom", p, m, 1, tuple(range(p)), actions, (tuple(range(p)),) * m, tuple(range(p)))


def test_validator_rejects():
    A = Action
    ok = {0: [A(0, "F", 0), A(0, "B", 0)], 1: [A(1, "F", 0), A(1, "B", 0)]}
    validate(_sched(ok))
    with pytest.raises(ScheduleError, match="missing"):
        validate(_sched({0: [A(0, "F", 0), A(0, "B", 0)], 1: [A(1, "F", 0)]}))
    with pytest.raises(ScheduleError, match="comes before"):
        validate(_sched({0: [A(0, "F", 0), A(0, "B", 0)], 1: [A(1, "B", 0), A(1, "F", 0)]}))
    with pytest.raises(ScheduleError, match="lives on rank"):
        validate(_sched({0: [A(1, "F", 0), A(0, "B", 0)], 1: [A(0, "F", 0), A(1, "B", 0)]}))
    with pytest.raises(ScheduleError, match="no matching"):
        validate(_sched({0: [A(0, "F", 0), A(0, "I", 0)], 1: [A(1, "F", 0), A(1, "B", 0)]}))
    with pytest.raises(ScheduleError, match="overlapped pair"):  # an F&B pair must be adjacent, other stage
        validate(Schedule(**{**vars(_sched(ok)), "overlapped": {A(0, "F", 0): A(0, "B", 0)}}))
    # Rank 0 runs mb 1's backward before mb 0's forward has been handed on: a wait cycle.
    dead = {
        0: [A(0, "F", 1), A(0, "B", 1), A(0, "F", 0), A(0, "B", 0)],
        1: [A(1, "F", 0), A(1, "B", 0), A(1, "F", 1), A(1, "B", 1)],
    }
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(_sched(dead, m=2))


def test_nccl_rendezvous_rules_catch_a_receive_posted_before_a_send_it_blocks():
    """Posting each receive one action early, per direction only, is deadlock-free on gloo but not on
    NCCL, where a pair's operations run in issue order and a large send waits for its receive: rank 0's
    send of F1 queues behind its receive of B0, which rank 1 sends only after computing F1."""
    from minipar.pp.validate import _check_lowered, check_rendezvous

    s = build_schedule("gpipe", 2, 2)
    eager = {
        0: "0F0 0SEND_F0 0RECV_B0 0F1 0SEND_F1 0RECV_B1 0B0 0B1",
        1: "1RECV_F0 1RECV_F1 1F0 1F1 1B0 1SEND_B0 1B1 1SEND_B1",
    }
    eager = {
        r: [
            Action(a.stage, a.kind, a.mb, peer=None if a.is_compute else 1 - r)
            for a in map(parse_action, acts.split())
        ]
        for r, acts in eager.items()
    }
    _check_lowered(s, eager)  # fine under gloo's model
    with pytest.raises(ScheduleError, match="NCCL"):
        check_rendezvous(s, eager)
    check_rendezvous(s, lower(s))  # lower() posts each pair's messages in one causal order


def test_lowering_posts_receives_early_and_in_send_order():
    s = build_schedule("1f1b", 2, 3)
    low = lower(s)
    assert [str(a) for a in low[1][:5]] == ["1RECV_F0", "1F0", "1RECV_F1", "1B0", "1SEND_B0"]
    assert all(a.peer == 0 for a in low[1] if a.kind.startswith("RECV"))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build_schedule("dualpipe", 3, 6), "even number of ranks"),
        (lambda: build_schedule("dualpipe", 4, 6), "2 \\* num_ranks"),
        (lambda: build_schedule("dualpipev", 4, 7), "num_microbatches >= 2"),
        (lambda: build_schedule("interleaved_1f1b", 4, 6, 2), "divisible"),
        (lambda: build_schedule("1f1b", 4, 8, 2), "num_chunks"),
        (lambda: build_schedule("pipedream_2bw", 4, 8, update_every=2), ">= num_ranks"),
        (lambda: build_schedule("nope", 4, 8), "unknown schedule"),
    ],
)
def test_bad_configs_name_the_constraint(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sim_deadlock_names_ops():
    lanes = {0: [sim.Op("a", 0, 1.0, ("b",))], 1: [sim.Op("b", 1, 1.0, ("a",))]}
    with pytest.raises(sim.Deadlock, match="waits for"):
        sim.run(lanes)
