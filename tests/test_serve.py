"""Serving: token identity with single-device GPT.generate for every layout under continuous
batching, a cache too small for everyone at once, bad input, the scheduler's invariants under
fuzzing, and the serving roofline.

Near-ties. Paged, packed decoding computes the same logits as `GPT.generate`'s uncached
forward up to fp32 rounding: the kernels see other shapes (one query against the cache
instead of the whole sequence; packed rows from several sequences), and the logits differ by
about 1e-7 here (`test_paged_logits_match_the_reference` measures it, under either CPU kernel
set). An argmax flips only if the best and second-best logits are closer than that, so each
parity test first asserts that the reference's smallest top-2 gap over every generated token
of every request is at least MARGIN = 1e-5, a hundred times the difference. The trace's seed
was picked so that it holds with room (seed 3: smallest gaps 1.8e-3 dense, 1.9e-3 MoE; seed 0
had 2.7e-5); were a seed or model changed into a near-tie, that assert (not a confusing token
mismatch) says so.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minipar.mesh import Mesh
from minipar.model import GPT, GPTConfig
from minipar.plan import serving as S
from minipar.runtime import DeadlineExceeded
from minipar.serve import (
    BlockManager,
    Frontend,
    Request,
    Scheduler,
    ServeConfig,
    StageRunner,
    blocks_for,
    make_requests,
    reference,
    serve,
    simulate,
    slots_of,
)
from minipar.serve.__main__ import main
from minipar.validation import ConfigError

MARGIN = 1e-5
DENSE = GPTConfig(vocab=64, seq=32, layers=4, heads=4, hidden=32)
MOE = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2)


def _workload(cfg, seed=3, n=10):
    """Mixed lengths and Poisson arrivals; the reference's tokens, after checking it has no near-tie."""
    reqs = make_requests(n, cfg.vocab, "2:10", "1:10", arrival_rate=300.0, seed=seed)
    model = GPT(cfg, 0)
    refs = [reference(model, r) for r in reqs]
    gap = min(m for _, m in refs)
    assert gap >= MARGIN, f"the reference has a near-tie (top-2 gap {gap:.1e}): pick another seed"
    return reqs, {r.id: tok for r, (tok, _) in zip(reqs, refs)}


@pytest.fixture(scope="module")
def dense():
    return _workload(DENSE)


@pytest.fixture(scope="module")
def moe():
    return _workload(MOE)


def _joined(res) -> bool:
    """Some step mixed a prefill with running decodes: a request joined a running batch (Orca)."""
    return any(0 < e.meta.get("prefills", 0) < e.meta.get("seqs", 0) for e in res.events)


LAYOUTS = {
    "tp2": ServeConfig(tp=2),
    "tp4": ServeConfig(tp=4),
    "pp2": ServeConfig(pp=2),
    "pp4": ServeConfig(pp=4),
    "dp2": ServeConfig(dp=2),
    "tp2pp2": ServeConfig(tp=2, pp=2),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_tokens_equal_generate(name, dense):
    reqs, want = dense
    sc = replace(LAYOUTS[name], max_batch=2)  # 2·pp slots for 10 requests: many join mid-run
    res = serve(DENSE, reqs, sc)
    assert [r.id for r in res.records] == [r.id for r in reqs]
    for rec in res.records:
        assert rec.tokens == want[rec.id], (name, rec.id)
        assert len(rec.times) == len(rec.tokens) and rec.ttft > 0 and min(rec.itl, default=1) > 0
    assert any(e.meta.get("seqs", 0) > 1 for e in res.events)  # sequences were batched
    if sc.pp <= 2:  # with pp4's 8 slots only 2 requests join late; whether beside a survivor is timing
        assert _joined(res), "no request joined a running batch"
    assert (
        res.free_blocks == [sc.blocks(max(r.cache_tokens for r in reqs))] * sc.replicas
    )  # every block came back
    if sc.dp > 1:
        assert len({rec.replica for rec in res.records}) == sc.dp  # the router used both replicas


def test_tokens_equal_generate_ep2_moe(moe):
    """Attention data-parallel over ep, experts split: dropless MoE decode with the all-to-all."""
    reqs, want = moe
    res = serve(MOE, reqs, ServeConfig(ep=2, max_batch=2))
    assert all(rec.tokens == want[rec.id] for rec in res.records)
    assert _joined(res) and any(e.name == "all_to_all" and e.axis == "ep" for e in res.events)
    # one request: replica 1 never has work, yet steps with zero tokens through every MoE block
    res = serve(MOE, reqs[:1], ServeConfig(ep=2))
    assert res.records[0].tokens == want[reqs[0].id]
    assert any(e.meta.get("tokens") == 0 and e.rank == 1 for e in res.events if e.cat == "compute")


def test_a_cache_too_small_for_everyone_makes_admission_wait(dense):
    """Room for one longest request per replica; all arrive at once: every request completes,
    none is lost, the tokens are still right, and admission waited for blocks."""
    reqs, want = dense
    reqs = [Request(r.id, r.prompt, r.max_new_tokens, 0.0) for r in reqs]
    need = blocks_for(max(r.cache_tokens for r in reqs), 2)
    res = serve(DENSE, reqs, ServeConfig(tp=2, block_size=2, num_blocks=need, max_batch=8))
    assert sorted(r.id for r in res.records) == sorted(r.id for r in reqs)
    assert all(
        rec.tokens == want[rec.id] and len(rec.tokens) == r.max_new_tokens
        for rec, r in zip(res.records, reqs)
    )
    assert res.cache_waits[0] > 0 and res.free_blocks == [need]


def test_paged_logits_match_the_reference():
    """In this process (one rank): the paged, packed forward's logits against GPT's, and the
    cache's storage per token against 2·L·a·d·4 bytes (K and V, fp32)."""
    reqs = make_requests(8, DENSE.vocab, "2:10", "1:10", seed=1)
    sc = ServeConfig(max_batch=3)
    nb = sc.blocks(max(r.cache_tokens for r in reqs))
    run = StageRunner(DENSE, sc.parallel(), Mesh(pp=1, dp=1, ep=1, tp=1), 0, nb, sc.block_size)
    front, ref, text, worst = Frontend(reqs, max_batch=3, num_blocks=nb), GPT(DENSE, 0), {}, 0.0
    while not front.done:
        (step,) = front.advance(1.0)
        if not step:
            continue
        ids = [t for w in step.works for t in (reqs[w.seq].prompt if w.prefill else text[w.seq][-1:])]
        x = run.forward(step, run.embed(step, ids))
        last = torch.tensor([w.tokens for w in step.works]).cumsum(0) - 1
        with torch.no_grad():
            logits = run.module.head(run.module.ln_f(x[last]))
            for w, lg in zip(step.works, logits):
                seq = text.setdefault(w.seq, list(reqs[w.seq].prompt))
                worst = max(worst, (lg - ref(torch.tensor([seq]))[0, -1]).abs().max().item())
                seq.append(int(lg.argmax()))
    assert worst < 1e-6, worst
    pool = sum(t.numel() * t.element_size() for t in (*run.k_pools.values(), *run.v_pools.values()))
    assert pool / (nb * sc.block_size) == 2 * DENSE.layers * DENSE.heads * DENSE.head_dim * 4


def test_block_manager_refuses_what_it_cannot_hold():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.admit(0, 9)  # 3 blocks promised, none taken yet
    assert bm.available() == 1 and not bm.can_admit(5) and bm.can_admit(4)
    with pytest.raises(RuntimeError, match="call can_admit first"):
        bm.admit(1, 5)
    assert bm.grow(0, 5) == [0, 1] and bm.available() == 1
    with pytest.raises(RuntimeError, match="grew past"):
        bm.grow(0, 13)
    bm.release(0)
    bm.check()
    assert bm.available() == 4 and slots_of([3, 1], 2, 6, 4) == [14, 15, 4, 5]
    with pytest.raises(ValueError, match="could never be admitted"):
        Scheduler(num_blocks=2, block_size=4, max_batch=1).add(Request(0, (1,) * 8, 2))


# ----------------------------------------------------------------------------- the scheduler, fuzzed
@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 2),
    st.sampled_from(["continuous", "static"]),
    st.integers(0, 10_000),
    st.integers(0, 6),
)
def test_scheduler_invariants(n, block_size, max_batch, pp, replicas, policy, seed, spare):
    """Random workloads through the Frontend, no ranks: no block leaked or owned twice, no
    batch over max_batch, every request's works are its positions in order (prefill first,
    then one token per visit, p ticks apart under pp), and every request finishes."""
    reqs = make_requests(n, 50, "1:9", "1:6", arrival_rate=float(1 + seed % 50), seed=seed)
    num_blocks = blocks_for(max(r.cache_tokens for r in reqs), block_size) + spare
    front = Frontend(reqs, replicas, pp, max_batch, num_blocks, block_size, policy)
    seen: dict[int, list] = {}
    now = 0.0
    while not front.done:
        for r, step in enumerate(front.advance(now)):
            assert len(step.works) <= max_batch and len({w.seq for w in step.works}) == len(step.works)
            for w in step.works:
                assert front.replica_of[w.seq] == r and len(w.table) * block_size >= w.start + w.tokens
                seen.setdefault(w.seq, []).append((step.tick, w))
        for s in front.schedulers:
            s.blocks.check()
            tables = [b for t in s.blocks.tables.values() for b in t]
            assert len(tables) == len(set(tables))
        now += 0.01
        assert front.tick < 10_000, "the frontend never finished"
    by_id = {r.id: r for r in reqs}
    assert set(seen) == set(by_id)
    for seq, works in seen.items():
        r = by_id[seq]
        assert len(works) == r.max_new_tokens and works[0][1].prefill and works[0][1].tokens == len(r.prompt)
        assert [w.start for _, w in works[1:]] == list(
            range(len(r.prompt), len(r.prompt) + r.max_new_tokens - 1)
        )
        assert all(b - a == pp for (a, _), (b, _) in zip(works, works[1:]))
        assert [w.last for _, w in works] == [False] * (len(works) - 1) + [True]
    for s in front.schedulers:
        assert len(s.blocks.free) == num_blocks and not s.blocks.tables


def test_continuous_beats_static_on_the_modeled_clock():
    reqs = make_requests(24, 32000, "64:512", "16:256", arrival_rate=40.0, seed=0)
    cost = S.step_cost("70b", S.Layout(tp=8), "h100")
    runs = {
        p: simulate(reqs, cost, max_batch=16, num_blocks=4096, block_size=16, policy=p).summary()
        for p in ("continuous", "static")
    }
    assert runs["continuous"]["throughput"] > 1.2 * runs["static"]["throughput"]
    assert runs["continuous"]["ttft_p99"] < runs["static"]["ttft_p99"]


# ----------------------------------------------------------------------------- bad input
BAD = [
    (["--tp", "3"], "--heads 4 must be divisible by --tp=3"),
    (["--pp", "3", "--tp", "1"], "--layers 4 must be divisible by --pp=3"),
    (["--ep", "2"], "--ep 2 needs an MoE model"),
    (["--tp", "1", "--pp", "1", "--ep", "2", "--experts", "3"], "--experts 3 must be divisible by --ep=2"),
    (["--prompt-len", "40", "--max-new-tokens", "30"], "needs 70 positions but the model has --seq=64"),
    (["--block-size", "0"], "--block-size 0 must be"),
    (["--num-blocks", "2"], "cannot hold even one request"),
    (["--arrival-rate", "-1"], "--arrival-rate -1.0 must be > 0"),
    (["--prompt-len", "9:3"], "needs 1 <= LO <= HI"),
    (["--out", "/proc/nope/x.jsonl"], "--out"),
]


@pytest.mark.parametrize("argv, says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_the_fix(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and all(ln.startswith("error: ") for ln in err.splitlines())


def test_every_problem_is_listed_at_once(capsys):
    assert main(["--tp", "abc", "--heads", "0", "--prompt-len", "x:y", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(
        f in " ".join(err) for f in ("--tp", "--heads", "--prompt-len", "--max-batch")
    )


def test_the_command_line_refuses_before_starting_and_the_python_entry_raises():
    out = subprocess.run(
        [sys.executable, "-m", "minipar.serve", "--tp", "3", "--block-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stderr.splitlines()  # block size; heads and vocab not divisible by tp
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 3, out.stderr
    with pytest.raises(ConfigError) as e:
        serve(DENSE, make_requests(2, 64, 4, 40), ServeConfig(tp=3, block_size=0))
    assert len(e.value.problems) == 4  # the same three, and 44 positions > seq (the cache check waits)


def test_command_line_run(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert (
        main(["--tp", "1", "--pp", "2", "--requests", "4", "--arrival-rate", "100", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "tokens/s" in text and "TTFT p50" in text and "ITL p50" in text and "for 4/4 requests" in text
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [set(x) for x in lines] == [{"id", "prompt", "tokens", "ttft", "itl"}] * 4
    assert all(len(x["itl"]) == len(x["tokens"]) - 1 for x in lines)
    assert (tmp_path / "r.timeline.png").stat().st_size > 0 and (tmp_path / "r.trace.json").exists()


# ----------------------------------------------------------------------------- the serving roofline
def test_roofline_decode_at_batch_1_is_the_formula():
    m, gpu, link, c = S.SERVING_MODELS["70b"], S.get_gpu("h100"), S.get_link("nvlink4"), 2048
    d, L, h, t = m.head_dim, m.layers, m.hidden, 8
    kv = 2 * (L / 1) * math.ceil(m.kv_heads / t) * d * 2  # K and V bytes per token per GPU
    formula = (2 * m.matmul_params / (t * 1) + 1 * c * kv) / gpu.memory_bandwidth + 2 * (L / 1) * (
        link.latency + (t - 1) * (1 * h * 2) / link.bandwidth
    )  # one-shot all-reduces
    assert S.token_latency(m, S.Layout(tp=8), "h100", 1, c) == formula
    lat = {k: S.token_latency("8b", S.Layout(tp=k), "h100") for k in (1, 2, 4, 8)}
    pp = {k: S.token_latency("8b", S.Layout(pp=k), "h100") for k in (1, 2, 4, 8)}
    assert lat[1] > lat[2] > lat[4] > lat[8] and pp[1] < pp[2] < pp[4] < pp[8]  # TP lowers, PP raises


def test_choose_layout():
    plan = S.choose_layout("70b", 8, "h100", latency_target=0.030, context=2048)
    best = plan.best
    assert best["itl"] <= 0.030 and best["throughput"] > 0 and best["layout"].gpus == 8
    assert all(r["throughput"] <= best["throughput"] for r in plan.rows)
    tight = S.choose_layout("70b", 8, "h100", latency_target=0.0125, context=2048)
    assert tight.best["layout"] == S.Layout(tp=8)  # only TP8 is fast enough
    assert S.main(["--gpus", "0", "--latency-ms", "x", "--model", "1t"]) == 2


@pytest.mark.parametrize("batch, prompt, layers", [(1, 5, 1), (4, 11, 2), (3, 7, 3)])
def test_a_decode_steps_flops_counted_by_torch_equal_the_formula_exactly(batch, prompt, layers):
    """2Ψ'b + 4hLΣc (plan.serving): every multiplying weight does a multiply-add per token, attention
    4h FLOPs per layer per cached position read. Counted by FlopCounterMode, attention on its math path."""
    cfg = GPTConfig(vocab=64, seq=64, layers=layers, heads=4, hidden=32)
    reqs = [Request(i, tuple(range(1, prompt + 1 + i)), 3) for i in range(batch)]
    runner = StageRunner(
        cfg, ServeConfig().parallel(), Mesh(pp=1, dp=1, ep=1, tp=1), seed=0, num_blocks=64, block_size=4
    )
    front = Frontend(reqs, max_batch=batch, num_blocks=64, block_size=4)
    (step,) = front.advance(0.0)  # the prefill
    tokens = runner.sample(
        step, runner.forward(step, runner.embed(step, [t for r in reqs for t in r.prompt]))
    )
    (step,) = front.advance(0.0)  # one decode step
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner.sample(step, runner.forward(step, runner.embed(step, tokens)))
    m = S.ServingModel.from_gpt(cfg)
    ctx = sum(w.start + 1 for w in step.works)
    assert len(step.works) == batch and ctx == sum(prompt + i + 1 for i in range(batch))
    assert counter.get_total_flops() == 2 * m.matmul_params * batch + 4 * cfg.hidden * cfg.layers * ctx


def _advance_then_spin(self, now, _real=Frontend.advance):
    self.ticks = getattr(self, "ticks", 0) + 1
    while self.ticks > 3:  # a scheduler bug: the fourth tick never ends, on every rank
        pass
    return _real(self, now)


def test_a_tick_that_never_ends_stops_the_run_with_every_rank_s_line(monkeypatch):
    """No communication is waiting, so only the progress clock can see it: serving beats once
    per tick, and a tick longer than ServeConfig.timeout ends the run, naming the line."""
    monkeypatch.setattr(Frontend, "advance", _advance_then_spin)
    reqs = make_requests(4, DENSE.vocab, "2:4", "2:4", arrival_rate=0.0, seed=0)
    with pytest.raises(DeadlineExceeded, match="made no progress for 3 s") as info:
        serve(DENSE, reqs, ServeConfig(tp=2, timeout=3.0))
    assert all("_advance_then_spin" in info.value.where[r] for r in (0, 1)), info.value.where
