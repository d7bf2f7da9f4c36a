"""Tensor and sequence parallelism (issue 4): parity with the single-device GPT, the
vocab-parallel loss against F.cross_entropy and DTensor's loss_parallel, exact
communication counts, activation memory against the adapted Korthikanti formula,
TP generation, the f/g/SP operators, and the exercises' checkers."""

import pytest
import torch
import torch.nn.functional as F
from _parity import assert_grads_match, assert_params_match
from _peers import full_params, full_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import Mesh, launch, mappings, trace
from minipar.activations import SavedActivations
from minipar.mappings import sync_sequence_parallel_grads
from minipar.model import GPT, GPTConfig, SyntheticData, make_optimizer, train_reference
from minipar.plan import serving
from minipar.sp import activation_bytes, comm_per_layer, comm_per_step, korthikanti_bytes, measure_layer
from minipar.tp import TPGPT, check_tp, train_tp, unshard, vocab_parallel_cross_entropy
from minipar.tp_generate import generate

CFG = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)
B, STEPS = 4, 3
MODES = [(False, True), (True, True), (True, False)]  # (sequence_parallel, regather)


# ----------------------------------------------------------------------------- parity
def _parity_rank(t):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from minipar.bench.tp import dtensor_loss

    Mesh(tp=t)
    runs = [train_tp(CFG, STEPS, B, sequence_parallel=sp, regather=rg, kind="sgd") for sp, rg in MODES]
    # The vocab-parallel loss on its own: ours vs F.cross_entropy vs DTensor's loss_parallel.
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(24, CFG.vocab, generator=gen) * 3
    target = torch.randint(0, CFG.vocab, (24,), generator=gen)
    mine = full.chunk(t, -1)[dist.get_rank()].clone().requires_grad_(True)
    ours = vocab_parallel_cross_entropy(mine, target)
    ours.backward()
    dmesh = init_device_mesh("cpu", (t,))
    dt = DTensor.from_local(full.chunk(t, -1)[dist.get_rank()].clone(), dmesh, [Shard(-1)]).requires_grad_(
        True
    )
    theirs = dtensor_loss(dt[None], target[None])
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        theirs.backward()
    return runs, ours.item(), mine.grad, theirs.full_tensor().item(), dt.grad.to_local()


@pytest.fixture(scope="module")
def reference():
    """The first backward's gradients, and the model after STEPS SGD steps with its logits on batch 0."""
    first = train_reference(CFG, steps=1, batch_size=B).grads
    ref = train_reference(CFG, steps=STEPS, batch_size=B, kind="sgd")
    with torch.no_grad():
        logits = ref.model(SyntheticData(CFG.vocab, CFG.seq, 0).batch(0, B)[0])
    return first, ref, logits


@pytest.mark.parametrize("t", [1, 2, 4])
def test_parity_with_reference_and_torch(reference, t):
    """TP, TP+SP and TP+SP without the re-gather on t ranks: every gradient of the first backward (shards
    put back together), the losses, logits and parameters after SGD steps (see tests/_parity.py)."""
    first, ref, ref_logits = reference
    out = launch(_parity_rank, t, t)
    for i, (sp, rg) in enumerate(MODES):
        ranks = [o[0][i] for o in out]
        what = f"t={t} sp={sp} regather={rg}"
        for r in ranks:
            assert max(abs(a - b) for a, b in zip(r["losses"], ref.losses)) < 1e-5, what
        logits = torch.cat([r["logits"] for r in ranks], -1)  # vocab shards
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=what)
        for key in ("first_grads", "params"):  # replicated tensors must agree across ranks too
            for name, (t0, dim) in ranks[0][key].items():
                if dim is None:
                    for r in ranks[1:]:
                        torch.testing.assert_close(r[key][name][0], t0, atol=1e-6, rtol=0)
        assert_grads_match(unshard([r["first_grads"] for r in ranks]), first, what=what)
        assert_params_match(
            unshard([r["params"] for r in ranks]), dict(ref.model.named_parameters()), what=what
        )
    # vocab-parallel cross-entropy vs F.cross_entropy and DTensor's loss_parallel
    gen = torch.Generator().manual_seed(7)
    full = (torch.randn(24, CFG.vocab, generator=gen) * 3).requires_grad_(True)
    target = torch.randint(0, CFG.vocab, (24,), generator=gen)
    want = F.cross_entropy(full, target)
    want.backward()
    for r, (_, ours, g_ours, theirs, g_theirs) in enumerate(out):
        assert abs(ours - want.item()) < 1e-6 and abs(theirs - want.item()) < 1e-6
        torch.testing.assert_close(g_ours, full.grad.chunk(t, -1)[r], atol=1e-7, rtol=0)
        torch.testing.assert_close(g_theirs, g_ours, atol=1e-7, rtol=0)


def _dtensor_tp(steps):
    """torch's own TP (DTensor parallelize_module, + SequenceParallel), the reference loop with SGD."""
    from torch.distributed.tensor.parallel import loss_parallel

    from minipar.bench.tp import dtensor_loss, dtensor_tp_model

    out = {}
    for sp in (False, True):
        model = dtensor_tp_model(CFG, 0, sp)
        opt = make_optimizer(model.parameters(), kind="sgd")
        data, losses, grads = SyntheticData(CFG.vocab, CFG.seq, 0), [], {}
        for step in range(steps):
            x, y = data.batch(step, B)
            opt.zero_grad(set_to_none=True)
            loss = dtensor_loss(model(x), y)
            with loss_parallel():
                loss.backward()
            grads = grads or {n: full_tensor(p.grad) for n, p in model.named_parameters()}
            opt.step()
            losses.append(loss.full_tensor().item())
        out[sp] = dict(losses=losses, grads=grads, params=full_params(model))
    return out


def test_dtensor_tp_model_matches_reference(reference):
    """torch's DTensor TP (and SP) on the same model: the first backward's gradients and the parameters and
    losses after SGD steps, as ours above."""
    first, ref, _ = reference
    for sp, theirs in launch(_dtensor_tp, 2, STEPS)[0].items():
        assert_grads_match(theirs["grads"], first, what=f"DTensor sp={sp}")
        assert max(abs(a - b) for a, b in zip(theirs["losses"], ref.losses)) < 1e-5
        assert_params_match(theirs["params"], dict(ref.model.named_parameters()), what=f"DTensor sp={sp}")


# ----------------------------------------------------------------------------- communication and memory
MEAS = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=64)


def _measure_rank(t):
    Mesh(tp=t)
    layers = [measure_layer(MEAS, 2, sequence_parallel=sp, regather=rg) for sp, rg in MODES]
    steps = []
    for sp, rg in MODES:  # one whole training step
        model = TPGPT(GPT(CFG, 0), "tp", sp, rg)
        x, y = SyntheticData(CFG.vocab, CFG.seq).batch(0, B)
        trace.reset()
        model(x, y)[1].backward()
        if sp:
            sync_sequence_parallel_grads(model)
        steps.append(trace.summary(trace.events()))
    return [{k: v for k, v in m.items() if k != "events"} for m in layers], steps


@pytest.mark.parametrize("t", [1, 2, 4])
def test_comm_and_activation_memory_match_formulas(t):
    out = launch(_measure_rank, t, t)
    for r, (layers, steps) in enumerate(out):
        for (sp, rg), m, step in zip(MODES, layers, steps):
            assert m["comm"] == comm_per_layer(2, MEAS.seq, MEAS.hidden, t, sp, rg), (t, sp, rg, m["comm"])
            M = (
                2 * MEAS.seq * MEAS.hidden * 4
            )  # forward: g after attention and after the MLP (or SP's halves)
            fwd = (
                {}
                if t == 1
                else {"reduce_scatter": (2, 2 * M), "all_gather": (2, 2 * M)}
                if sp
                else {"all_reduce": (2, 2 * M)}
            )
            assert m["comm_forward"] == fwd, (t, sp, rg, m["comm_forward"])
            # claimed exact (every term of `activation_bytes` is a tensor autograd saves): asserted exactly
            assert m["activation_bytes"] == activation_bytes(
                MEAS.seq, 2, MEAS.hidden, MEAS.heads, t, sp, rg
            ), (t, sp, rg)
            got = {op: (s["count"], s["bytes"]) for (op, axis), s in step.get(r, {}).items()}
            assert got == comm_per_step(CFG, B, t, sp, rg), (t, sp, rg, got)
        if t > 1:
            tp_mem, sp_mem = layers[0]["activation_bytes"], layers[1]["activation_bytes"]
            one = activation_bytes(MEAS.seq, 2, MEAS.hidden, MEAS.heads, 1)
            assert sp_mem == pytest.approx(one / t, rel=1e-9)  # SP divides every term by t
            assert tp_mem > sp_mem


@settings(max_examples=40, deadline=None)
@given(
    s=st.sampled_from([64, 512, 2048]),
    b=st.integers(1, 8),
    h=st.sampled_from([64, 1024, 8192]),
    a=st.sampled_from([8, 32, 64]),
    t=st.sampled_from([1, 2, 4, 8]),
)
def test_formulas_relations(s, b, h, a, t):
    # With SP every stored term is split: exactly 1/t of the unsplit layer.
    assert activation_bytes(s, b, h, a, t, sp=True) == pytest.approx(activation_bytes(s, b, h, a, 1) / t)
    # Our sbh terms are the paper's in fp32 (x2) without its dropout masks (2sbh) and s x s terms;
    # what is left is O(sb): LayerNorm statistics (4 floats per token) and SDPA's log-sum-exp.
    for sp in (False, True):
        ours_sbh = activation_bytes(s, b, h, 0, t, sp) - 4 * 4 * s * b / (t if sp else 1)
        paper_sbh = korthikanti_bytes(s, b, h, 0, t, sp) - 2 * s * b * h / (t if sp else 1)
        assert ours_sbh == pytest.approx(2 * paper_sbh)
    # SP moves the same bytes on the wire as TP's all-reduces (ring: 2(t-1)/t vs (t-1)/t each),
    # plus the two backward re-gathers when it stores only the s/t shard.
    tp = comm_per_layer(b, s, h, t)
    sp = comm_per_layer(b, s, h, t, sp=True, regather=False)
    if t > 1:
        assert 2 * tp["all_reduce"][1] == sp["all_gather"][1] + sp["reduce_scatter"][1]
    assert serving.token_latency("8b", serving.Layout(tp=t)) <= serving.token_latency(
        "8b", serving.Layout(tp=1)
    )


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    v=st.integers(2, 40),
    scale=st.sampled_from([0.1, 10.0, 1e3]),
    seed=st.integers(0, 99),
)
def test_vocab_parallel_cross_entropy_math(n, v, scale, seed):
    # On one rank the three all-reduces are no-ops, leaving the arithmetic: a max-shifted
    # log-sum-exp (stable even for logits of 1e3) and the softmax - onehot backward.
    from minipar.mesh import set_mesh

    Mesh(tp=1)
    try:
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(n, v, generator=gen) * scale).requires_grad_(True)
        target = torch.randint(0, v, (n,), generator=gen)
        ours = vocab_parallel_cross_entropy(logits, target)
        ours.backward()
        ref = logits.detach().clone().requires_grad_(True)
        want = F.cross_entropy(ref, target)
        want.backward()
        assert torch.isfinite(ours)
        torch.testing.assert_close(ours, want, atol=1e-5 * max(1.0, scale), rtol=1e-6)
        torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)
    finally:
        set_mesh(None)


def test_activation_meter_counts_each_storage_once():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(lin) as m:
        h = lin(x)
        F.gelu(h) + F.gelu(h)  # h saved twice, counted once; the weight is not an activation
    assert m.bytes == x.numel() * 4 + h.numel() * 4
    with SavedActivations() as m2:
        lin(x)
    assert m2.bytes == x.numel() * 4 + lin.weight.numel() * 4


# ----------------------------------------------------------------------------- generation
GEN = GPTConfig(vocab=64, seq=48, layers=2, heads=4, hidden=32)


def _generate_rank(prompt):
    import torch.distributed as dist

    Mesh(tp=dist.get_world_size())
    return generate(TPGPT(GPT(GEN, 0)), prompt, 32)


def test_generation_is_token_identical():
    prompt = torch.randint(0, GEN.vocab, (3, 8), generator=torch.Generator().manual_seed(1))
    want = GPT(GEN, 0).generate(prompt, 32)
    assert want.shape == (3, 40)
    for t in (1, 2, 4):
        for got in launch(_generate_rank, t, prompt):
            assert torch.equal(got, want), t


def test_generation_rejects_overlong_and_sp():
    from minipar.mesh import set_mesh

    Mesh(tp=1)  # a single process: the "tp" axis has one rank
    try:
        model = TPGPT(GPT(GEN, 0))
        with pytest.raises(ValueError, match="exceeds cfg.seq"):
            generate(model, torch.zeros(1, 20, dtype=torch.long), 40)
        with pytest.raises(ValueError, match="sequence_parallel=False"):
            generate(TPGPT(GPT(GEN, 0), sequence_parallel=True), torch.zeros(1, 4, dtype=torch.long), 2)
    finally:
        set_mesh(None)


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    "cfg, t, sp, word",
    [
        (GPTConfig(vocab=64, heads=6, hidden=48), 4, False, "heads"),
        (GPTConfig(vocab=50, heads=4, hidden=32), 4, False, "vocab"),
        (GPTConfig(vocab=64, seq=30, heads=4, hidden=32), 4, True, "seq"),
        (GPTConfig(vocab=64, heads=4, hidden=32), 0, False, ">= 1"),
    ],
)
def test_bad_sizes_raise_clear_errors(cfg, t, sp, word):
    with pytest.raises(ValueError, match=word):
        check_tp(cfg, t, sp)
    if t:  # the launching entry point checks before forking any rank
        from minipar.tp import run_tp

        with pytest.raises(ValueError, match=word):
            run_tp(cfg, t, sequence_parallel=sp)
    check_tp(CFG, 4, True)  # and a good one passes


# ----------------------------------------------------------------------------- the comm operators
def _ops_rank():
    import torch.distributed as dist

    Mesh(tp=2)
    r = dist.get_rank()
    x = torch.arange(12.0).view(2, 3, 2) + 100 * r
    res = {}
    for name, fn in {
        "f": lambda v: mappings.f(v),
        "g": lambda v: mappings.g(v),
        "gather": lambda v: mappings.gather_along(v, 1),
        "gather_split": lambda v: mappings.gather_along(v, 1, grad="split"),
        "rs": lambda v: mappings.reduce_scatter_along(torch.cat([v, v + 1], 1), 1),
        "split": lambda v: mappings.split_along(torch.cat([v, v], 1), 1),
    }.items():
        v = x.clone().requires_grad_(True)
        y = fn(v)
        (y * (1 + r)).sum().backward()  # rank-dependent upstream gradient
        res[name] = (y.detach(), v.grad)
    return res


def test_megatron_and_sp_operators():
    out = launch(_ops_rank, 2)
    x = [torch.arange(12.0).view(2, 3, 2) + 100 * r for r in range(2)]
    ones = torch.ones(2, 3, 2)
    for r, res in enumerate(out):
        y, dx = res["f"]
        assert torch.equal(y, x[r]) and torch.equal(dx, 3 * ones)  # identity fwd, all-reduce bwd
        y, dx = res["g"]
        assert torch.equal(y, x[0] + x[1]) and torch.equal(dx, (1 + r) * ones)  # all-reduce fwd, identity bwd
        y, dx = res["gather"]
        assert torch.equal(y, torch.cat(x, 1)) and torch.equal(dx, 3 * ones)  # bwd: reduce-scatter
        y, dx = res["gather_split"]
        assert torch.equal(dx, (1 + r) * ones)  # bwd: keep my chunk
        y, dx = res["rs"]
        cat = [torch.cat([v, v + 1], 1) for v in x]
        assert torch.equal(y, (cat[0] + cat[1]).chunk(2, 1)[r]) and torch.equal(
            dx, 3 * ones
        )  # bwd: all-gather
        y, dx = res["split"]
        assert torch.equal(y, x[r]) and torch.equal(dx, 3 * ones)
