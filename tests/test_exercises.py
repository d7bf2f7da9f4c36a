"""The course kit: every exercise grades itself, cannot be fooled, and cannot hang.

(a) Every registered exercise passes its worked solution (instructor/solutions/NN_name.py) and
    refuses at least two plausible wrong answers, each with a message and a hint.
(b) The exploits a student would try get NOT RIGHT: calling the package function the answer is
    compared with (directly, through a lambda, or swallowing the refusal), a direct send to every
    peer instead of a ring.
(c) Hangs end within the deadline with "did not finish within N s", the rank and the line; a
    send/recv cycle is named a deadlock. A crash shows the student's own line.
(d) "NOT YET" means the function raised NotYet when called; randomized cases follow the seed;
    partial credit is by case.
The student copies are tested in tests/test_student_copies.py.
"""

from __future__ import annotations

import importlib
import os
import random
import runpy
import time

import pytest
import torch
import torch.nn.functional as F

from minipar import comm, mappings, plan, runtime
from minipar.collectives import ring_neighbours
from minipar.exercises import EXERCISES, NotYet, check, load_all
from minipar.pp import build_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
load_all()


def solution(name: str):
    """The worked solution of exercise `name`, from instructor/solutions."""
    ex = EXERCISES[name]
    return runpy.run_path(os.path.join(ROOT, "instructor", "solutions", ex.notebook + ".py"))[ex.function]


def line_of(fn, text: str) -> int:
    """The line number in this file of the line of `fn` containing `text`."""
    src, start = fn.__code__.co_filename, fn.__code__.co_firstlineno
    lines = open(src).read().splitlines()
    return next(i + 1 for i in range(start - 1, len(lines)) if text in lines[i])


# ----------------------------------------------------------------------------- (a) solutions and wrong answers
@pytest.mark.slow
def test_every_exercise_has_a_worked_solution_that_passes():
    files = sorted(
        f[:-3] for f in os.listdir(os.path.join(ROOT, "instructor", "solutions")) if f.endswith(".py")
    )
    assert sorted(ex.notebook for ex in EXERCISES.values()) == files
    for name in EXERCISES:
        v = check(name, solution(name))
        assert v and v.earned == v.points == 10, (name, str(v))
        assert "of" in v.message and "cases" in v.message


def _ring_forwarding_its_own_block(x, group=None):  # the classic off-by-one
    r, n, left, right = ring_neighbours(group)
    blocks = [x] * n
    for s in range(n - 1):
        buf = torch.empty_like(x)
        for h in comm.batch_p2p(sends=[(x, right)], recvs=[(buf, left)]):
            h.wait()
        blocks[(r - s - 1) % n] = buf
    return torch.cat(blocks)


def _sends_to_every_peer(x, group=None):  # a direct all-gather, not a ring
    n, r = runtime.world_size(), runtime.rank()
    bufs = [torch.empty_like(x) for _ in range(n)]
    bufs[r] = x
    peers = [j for j in range(n) if j != r]
    for h in comm.batch_p2p(sends=[(x, j) for j in peers], recvs=[(bufs[j], j) for j in peers]):
        h.wait()
    return torch.cat(bufs)


def _moe(name):
    def wrong(p, k, C):
        i, w, keep = solution("moe_topk_capacity")(p, k, C)
        if name == "no capacity":
            return i, w, torch.ones_like(i, dtype=torch.bool)
        if name == "token-major":
            oh = F.one_hot(i, p.shape[1]).flatten(0, 1)  # token 0's choices, then token 1's...
            return i, w, (((oh.cumsum(0) - 1) * oh).sum(-1).view_as(i) < C)
        return i, p.gather(-1, i), keep  # unnormalized

    return wrong


def _mem(kind):
    def wrong(psi, l, h, a, s, b, t, p, d, z, rc):
        if kind == "Ψ not split by t":
            return solution("memory_per_gpu")(psi * t, l, h, a, s, b, t, p, d, z, rc)
        sp = kind != "no SP"
        in_flight = 1 if kind == "one micro-batch" else p
        return plan.model_state_bytes(
            psi / (t * p), d, z
        ) + l / p * in_flight * plan.activation_bytes_per_layer(s, b, h, a, t, sp, rc)

    return wrong


def _fp8(kind):
    def wrong(x, hist, fmt):
        dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
        m = torch.finfo(dt).max
        ref = max(hist) if kind != "current amax" else x.abs().max().item()
        s = 2.0 ** torch.tensor(m / ref).log2().floor().item() if ref > 0 else 1.0
        if kind == "no clamp":
            return (x * s).to(dt).to(x.dtype) / s
        if kind == "never unscales":
            return (x * s).clamp(-m, m).to(dt).to(x.dtype)
        return (x * s).clamp(-m, m).to(dt).to(x.dtype) / s

    return wrong


WRONG = {
    "ring_all_gather": [
        (lambda x, group=None: comm.all_gather(x), "all_gather"),
        (_ring_forwarding_its_own_block, "gathered tensor"),
        (_sends_to_every_peer, "right neighbour"),
    ],
    "dp_allreduce": [
        (lambda model: [comm.all_reduce(p.grad) for p in model.parameters()], "off by"),
        (lambda model: None, "off by"),
    ],
    "zero_shard": [
        (lambda flat: comm.reduce_scatter(flat, op="avg"), "raised"),
        (
            lambda flat: comm.reduce_scatter(
                torch.cat(
                    [flat, flat.new_zeros(-(-flat.numel() // comm.size()) * comm.size() - flat.numel())]
                )
            ),
            "off by",
        ),
    ],
    "tp_mlp": [
        (
            lambda x, fw, fb, pw, pb, g: mappings.g(F.linear(F.gelu(F.linear(x, fw, fb)), pw), g) + pb,
            "input gradient",
        ),
        (
            lambda x, fw, fb, pw, pb, g: mappings.g(
                F.linear(F.gelu(F.linear(mappings.f(x, g), fw, fb)), pw, pb), g
            ),
            "output",
        ),
    ],
    "sp_mlp": [
        (
            lambda x, fw, fb, pw, pb, g: (
                mappings.split_along(
                    mappings.g(F.linear(F.gelu(F.linear(mappings.gather_along(x, 1, g), fw, fb)), pw), g),
                    1,
                    g,
                )
                + pb
            ),
            "communication",
        ),
        (
            lambda x, fw, fb, pw, pb, g: (
                mappings.g(F.linear(F.gelu(F.linear(mappings.f(x, g), fw, fb)), pw), g) + pb
            ),
            "",
        ),
    ],
    "pp_1f1b": [
        (
            lambda p, m: {
                r: [f"{r}F{i}" for i in range(m)] + [f"{r}B{i}" for i in range(m)] for r in range(p)
            },
            "holds",
        ),  # GPipe
        (
            lambda p, m: {
                r: [f"{r}B{i}" for i in range(m)] + [f"{r}F{i}" for i in range(m)] for r in range(p)
            },
            "not a valid schedule",
        ),
    ],  # backward first
    "cp_merge": [
        (lambda oa, la, ob, lb: ((oa + ob) / 2, torch.logaddexp(la, lb)), "merged output"),
        (
            lambda oa, la, ob, lb: (
                (torch.exp(la).unsqueeze(-1) * oa + torch.exp(lb).unsqueeze(-1) * ob)
                / (torch.exp(la) + torch.exp(lb)).unsqueeze(-1),
                torch.log(torch.exp(la) + torch.exp(lb)),
            ),
            "inf or nan",
        ),
    ],
    "moe_topk_capacity": [
        (_moe("no capacity"), "keep differs"),
        (_moe("token-major"), "keep differs"),
        (_moe("unnormalized"), "weights"),
    ],
    "nd_layout": [
        (lambda: dict(tp=16, pp=1, dp=1, zero_stage=1), "spans more than one node"),
        (lambda: dict(tp=2, pp=1, dp=4, zero_stage=1), "there are 16 GPUs"),
        (lambda: dict(tp=1, pp=1, dp=16, zero_stage=0), "does not fit"),
        (lambda: dict(tp=1, pp=1, dp=16, zero_stage=3), "predicts MFU"),
    ],
    "memory_per_gpu": [
        (_mem("Ψ not split by t"), "expected"),
        (_mem("one micro-batch"), "expected"),
        (_mem("no SP"), "expected"),
    ],
    "fp8_fake_quant": [
        (_fp8("no clamp"), "inf or nan"),
        (_fp8("current amax"), "off by"),
        (_fp8("never unscales"), "power of two"),
    ],
    "serve_admission": [
        (lambda r, now, b, mb, av, bs: r.arrival <= now and b < mb, "expected False"),  # no cache
        (
            lambda r, now, b, mb, av, bs: (
                r.arrival <= now
                and b < mb  # the prompt only
                and -(-len(r.prompt) // bs) <= av
            ),
            "expected False",
        ),
        (
            lambda r, now, b, mb, av, bs: (
                r.arrival <= now
                and b < mb  # counts the last token
                and -(-(len(r.prompt) + r.max_new_tokens) // bs) <= av
            ),
            "expected True",
        ),
        (
            lambda r, now, b, mb, av, bs: (
                b < mb  # before it arrives
                and -(-(len(r.prompt) + r.max_new_tokens - 1) // bs) <= av
            ),
            "has not arrived",
        ),
    ],
}


def test_every_exercise_has_wrong_answers_listed():
    assert set(WRONG) == set(EXERCISES) and all(len(w) >= 2 for w in WRONG.values())


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_answers_are_refused_with_a_hint(name):
    for wrong, says in WRONG[name]:
        v = check(name, wrong, first_failure=True)
        assert not v and v.status == "not right" and says in str(v) and v.hint, (name, says, str(v))
        assert str(v).startswith("NOT RIGHT (0/10 points)") or "points)" in str(v)


# ----------------------------------------------------------------------------- (b) exploits
def test_calling_the_package_function_is_refused_and_said_why():
    exploits = {
        "pp_1f1b": lambda p, m: build_schedule("1f1b", p, m).actions,  # a lambda over the package
        "cp_merge": __import__("minipar.cp", fromlist=["x"]).merge_attention,  # the package function itself
        "moe_topk_capacity": _uses_assign_slots,
        "ring_all_gather": lambda x, group=None: comm.all_gather(x),
        "nd_layout": lambda: {
            k: plan.plan("13b", 16, "h100").best.config[k] for k in ("tp", "pp", "dp", "zero_stage")
        },
    }
    for name, fn in exploits.items():
        v = check(name, fn)
        assert not v and v.earned == 0, (name, str(v))
        if name != "ring_all_gather":  # all_gather is also refused structurally, whichever comes first
            assert "calls minipar." in v.message and "disabled" in v.message, (name, str(v))
    # swallowing the refusal does not help: the call is noted even if the raise is caught
    v = check("pp_1f1b", _swallows_the_refusal)
    assert not v and "calls minipar.pp.schedules.build_schedule" in v.message


def _uses_assign_slots(probs, k, capacity):
    from minipar.moe import assign_slots

    w, i = probs.topk(k, dim=-1)
    return i, w / w.sum(-1, keepdim=True) if k > 1 else w, assign_slots(i, probs.shape[-1]) < capacity


def _swallows_the_refusal(p, m):
    try:
        return build_schedule("1f1b", p, m).actions
    except BaseException:  # noqa: BLE001 - the exploit under test
        return solution("pp_1f1b")(p, m)


def test_the_checkers_own_expectations_are_disabled_too():
    """A checker's `_expected` (what it compares with) is as forbidden as the package's function."""
    for ex in EXERCISES.values():
        module = importlib.import_module(ex.judge.__module__)
        if hasattr(module, "_expected"):
            assert module._expected in ex.forbidden, ex.name
    serve = importlib.import_module("minipar.exercises.serve")
    v = check("serve_admission", serve._expected)
    assert not v and "calls minipar.exercises.serve._expected" in v.message


def test_a_direct_send_to_every_peer_is_not_a_ring():
    v = check("ring_all_gather", _sends_to_every_peer)
    assert not v and "sent to rank 2" in v.message and "right neighbour" in v.message, str(v)
    assert v.cases[0].passed  # N = 2: the only peer is the right neighbour, so it is a ring there


# ----------------------------------------------------------------------------- (c) hangs and crashes
def _spins(p, m):
    while True:
        pass


def _ring_never_advances(x, group=None):
    r, n, left, right = ring_neighbours(group)
    blocks, s = [x] * n, 0
    while s < n - 1:  # forgot s += 1
        buf = torch.empty_like(x)
        for h in comm.batch_p2p(sends=[(blocks[(r - s) % n], right)], recvs=[(buf, left)]):
            h.wait()
    return torch.cat(blocks)


def _ring_blocking_sends(x, group=None):
    r, n, left, right = ring_neighbours(group)
    blocks = [x] * n
    for s in range(n - 1):
        comm.send(blocks[(r - s) % n], right)  # every rank sends first: nobody receives
        buf = comm.recv(torch.empty_like(x), left)
        blocks[(r - s - 1) % n] = buf
    return torch.cat(blocks)


def test_a_hang_ends_within_the_deadline_with_the_line():
    t = time.time()
    v = check("pp_1f1b", _spins, deadline_scale=0.3)  # 3 s per case
    took = time.time() - t
    assert not v and "did not finish within 3 s" in v.message, str(v)
    loop = line_of(_spins, "while True")  # the sample lands on either line of the loop
    assert (f"line {loop}," in v.message or f"line {loop + 1}," in v.message) and "rank 0" in v.message
    assert took < 12 and all(c.status == "skipped" for c in v.cases[1:])  # the other cases are not waited for


def test_a_ring_that_never_advances_is_stopped_and_each_rank_named():
    v = check("ring_all_gather", _ring_never_advances, deadline_scale=0.25)
    assert not v and "did not finish within 5 s" in v.message, str(v)
    assert "rank 0" in v.message and "rank 1" in v.message
    assert "_ring_never_advances" in v.message


def test_a_deadlocked_ring_is_called_a_deadlock():
    t = time.time()
    v = check("ring_all_gather", _ring_blocking_sends, first_failure=True)
    assert not v and "deadlock" in v.message and "hint" in str(v), str(v)
    assert f"line {line_of(_ring_blocking_sends, 'comm.send(')}" in v.message
    assert time.time() - t < 20


def _bincount_on_2d(probs, k, capacity):
    w, i = probs.topk(k, dim=-1)
    per_expert = torch.bincount(i)  # i is [T, k]: bincount needs 1-d
    return i, w, per_expert[i] < capacity


def test_a_crash_shows_the_students_own_line():
    v = check("moe_topk_capacity", _bincount_on_2d, first_failure=True)
    assert not v and "your code raised RuntimeError" in v.message
    assert f"test_exercises.py, line {line_of(_bincount_on_2d, 'bincount(i)')}" in v.message
    assert "per_expert = torch.bincount(i)" in v.message, str(v)


# ----------------------------------------------------------------------------- (d) NotYet, seeds, credit
def test_not_yet_means_the_function_raised_not_yet():
    def stub(p, m):
        """The placeholder of a student copy."""
        raise NotYet("write this function")

    def done_with_the_stub_line_left_below(p, m):
        return solution("pp_1f1b")(p, m)
        raise NotYet("write this function")  # unreachable: a student's leftover

    v = check("pp_1f1b", stub)
    assert not v and v.status == "not yet" and str(v).startswith("NOT YET") and "raised NotYet" in v.message
    assert check("pp_1f1b", done_with_the_stub_line_left_below)
    assert check("pp_1f1b", None).status == "not yet"


def test_randomized_cases_follow_the_instructors_seed(monkeypatch):
    ex = EXERCISES["pp_1f1b"]
    names = lambda seed: [c.name for c in ex.cases(random.Random(f"pp_1f1b:{seed}"))]  # noqa: E731
    assert names(0) == names(0) and names(0) != names(1)
    assert [n for n in names(0) if not n.startswith("random")] == [
        n for n in names(1) if not n.startswith("random")
    ]
    monkeypatch.setenv("MINIPAR_EXERCISE_SEED", "1")
    v = check("pp_1f1b", solution("pp_1f1b"))
    assert "seed 1" in v.message and [c.name for c in v.cases] == names(1)
    assert all(ex.cases(random.Random(f"{n}:0")) for n, ex in EXERCISES.items())
    assert all(
        any(c.random for c in ex.cases(random.Random("x"))) for n, ex in EXERCISES.items() if n != "nd_layout"
    )


def test_partial_credit_is_by_case():
    def no_min(p, m):  # right while m >= p; with fewer micro-batches than ranks it warms up past m
        return {
            r: [f"{r}F{i}" for i in range(p - 1 - r)]
            + [a for i in range(m - (p - 1 - r)) for a in (f"{r}F{p - 1 - r + i}", f"{r}B{i}")]
            + [f"{r}B{i}" for i in range(max(0, m - (p - 1 - r)), m)]
            for r in range(p)
        }

    v = check("pp_1f1b", no_min, seed=0)
    assert not v and 0 < v.earned < v.points, str(v)
    assert v.earned == pytest.approx(sum(c.earned for c in v.cases), abs=0.01)
    assert [c.name for c in v.cases if not c.passed] and "p=4, m=2" in v.message
