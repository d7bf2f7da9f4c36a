"""Mixture of experts and expert parallelism: routing, capacity, losses, balancing, EP parity."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _moe_reference import PaperMoE, train_paper
from _parity import assert_grads_match, assert_params_match
from _wire import handed_to_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import minipar
from minipar import runtime, trace
from minipar.ep import a2a_formula, check_ep, dispatch_combine, run_ep, train_moe
from minipar.mesh import Mesh
from minipar.model import GPT, MLP, GPTConfig, train_reference
from minipar.moe import (
    MoE,
    assign_slots,
    capacity,
    moe_layers,
    route,
    router_z_loss,
    switch_aux_loss,
    update_bias,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32, experts=4, top_k=1, moe_groups=4)


# ----------------------------------------------------------------------------- capacity and slots
def test_capacity_formula():
    assert capacity(64, 4, 1, 1.0) == 16
    assert capacity(64, 4, 2, 1.25) == 40  # ceil(64*2*1.25/4)
    assert capacity(10, 3, 1, 1.0) == 4  # ceil(10/3)
    assert capacity(8, 4, 1, 1.0, min_capacity=5) == 5
    assert capacity(64, 4, 2, float("inf")) == 64  # dropless: every token fits in any expert


@pytest.mark.parametrize(
    "args, match",
    [((16, 4, 5, 1.0), "top_k"), ((16, 4, 1, 0.0), "capacity_factor"), ((16, 4, 1, -1.0), "capacity_factor")],
)
def test_capacity_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        capacity(*args)


def _naive_keep(index, E, C):
    """Slots handed out one choice at a time: all first choices in token order, then the second..."""
    T, k = index.shape
    used, keep = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(index[t, j])
            keep[t, j] = used[e] < C
            used[e] += 1
    return keep


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 24),
    E=st.integers(1, 6),
    k=st.integers(1, 3),
    C=st.integers(0, 10),
    seed=st.integers(0, 99),
)
def test_assign_slots_matches_first_come_first_served(T, E, k, C, seed):
    k = min(k, E)
    probs = torch.rand(T, E, generator=torch.Generator().manual_seed(seed))
    index = probs.topk(k, -1).indices
    keep = assign_slots(index, E) < C
    assert torch.equal(keep, _naive_keep(index, E, C))
    assert (torch.bincount(index[keep], minlength=E) <= C).all()


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("E", [2, 4, 8])
def test_switch_aux_loss_uniform_is_alpha_and_collapsed_is_alpha_E(E):
    T, alpha = 8 * E, 0.01
    uniform = torch.full((T, E), 1.0 / E)
    balanced = torch.arange(T).remainder(E)[:, None]  # first choices spread evenly
    assert switch_aux_loss(uniform, balanced, alpha).item() == pytest.approx(alpha, rel=1e-6)
    collapsed = F.one_hot(torch.zeros(T, dtype=torch.long), E).float()
    assert switch_aux_loss(collapsed, torch.zeros(T, 1, dtype=torch.long), alpha).item() == pytest.approx(
        alpha * E
    )
    # f comes from the first choice only, and groups average
    two = torch.stack([balanced[:, 0], (balanced[:, 0] + 1) % E], -1)
    assert switch_aux_loss(uniform, two, alpha).item() == pytest.approx(alpha, rel=1e-6)
    grouped = switch_aux_loss(
        torch.stack([uniform, collapsed]), torch.stack([balanced, torch.zeros_like(balanced)])
    )
    assert grouped.item() == pytest.approx((alpha + alpha * E) / 2, rel=1e-6)


def test_router_z_loss_and_routers():
    assert router_z_loss(torch.zeros(5, 4), 1e-3).item() == pytest.approx(1e-3 * math.log(4) ** 2)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    probs, index, w = route(logits, 1, "softmax")
    assert torch.equal(index[:, 0], logits.argmax(-1)) and torch.allclose(w[:, 0], probs.max(-1).values)
    probs, index, w = route(logits, 2, "sigmoid", bias=torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert (index == 3).any(-1).all()  # the bias forces expert 3 into every top-2
    assert torch.allclose(w.sum(-1), torch.ones(6)) and torch.allclose(probs.sum(-1), torch.ones(6))
    s = torch.sigmoid(logits)
    assert torch.allclose(
        w, s.gather(-1, index) / s.gather(-1, index).sum(-1, keepdim=True)
    )  # bias not in weights


# ----------------------------------------------------------------------------- the layer, single device
@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=1, capacity_factor=1.0),
        dict(top_k=2, capacity_factor=0.75),
        dict(top_k=2, router="sigmoid", shared_expert=True),
        dict(top_k=1, capacity_factor=0.5, shared_expert=True),
        dict(top_k=3, experts=5, capacity_factor=1.0, z_loss=1e-3, min_capacity=9),
    ],
)
def test_moe_layer_equals_the_papers_dispatch_and_combine(kw):
    """Routing, gates, capacity, dropping, aux and z-loss against the layer written from the Switch and GShard
    papers in tests/_moe_reference.py (nothing of minipar.moe; GShard's dense dispatch/combine einsums), on the
    same parameters: the output, the kept mask, the loss and every gradient."""
    cfg = CFG.replace(moe_groups=2, **kw)
    moe = GPT(cfg, seed=3).blocks[0].mlp
    paper = PaperMoE.sharing(moe)
    x = torch.randn(40, cfg.hidden, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, layer in (("minipar", moe), ("paper", paper)):
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        (y.square().sum() + layer.aux_loss).backward()
        grads[name] = {"x": xs.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}
        layer.zero_grad(set_to_none=True)
        if name == "minipar":
            want_y, want_aux = y.detach(), layer.aux_loss.detach()
    assert torch.allclose(want_y, paper(x).detach(), atol=1e-6)
    assert torch.equal(moe.stats["keep"], paper.keep) and moe.stats["dropped"] == paper.dropped
    assert torch.allclose(want_aux, paper.aux_loss.detach(), atol=1e-7, rtol=1e-6)
    assert_grads_match(grads["minipar"], grads["paper"])
    if cfg.capacity_factor < 1:
        assert paper.dropped > 0, "this case must drop tokens"
        dropped = ~paper.keep.any(-1)  # every choice dropped: residual only
        shared = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
        assert torch.allclose(want_y[dropped], shared[dropped].detach(), atol=1e-6)


def test_moe_in_gpt_adds_aux_loss_and_reference_loop_matches():
    cfg = CFG.replace(top_k=2, capacity_factor=1.0, z_loss=1e-3, moe_every=2)
    model = GPT(cfg, seed=0)
    assert [type(b.mlp) for b in model.blocks] == [MLP, MoE]
    x = torch.randint(0, cfg.vocab, (8, cfg.seq))
    logits, loss = model(x, x)
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert model.aux_loss().item() > cfg.aux_alpha * 0.5 and torch.allclose(loss, ce + model.aux_loss())
    ref = train_reference(cfg, steps=2, batch_size=8)
    mine = train_moe(cfg, steps=2, batch_size=8)
    assert ref.losses == mine.losses
    assert all(torch.equal(ref.grads[n], mine.grads[n]) for n in ref.grads) and set(ref.grads) == set(
        mine.grads
    )


def test_update_bias_moves_against_load():
    model = GPT(CFG.replace(experts=4), seed=0)
    update_bias(model, 0.1, loads=[torch.tensor([10, 2, 4, 4])] * 2)
    for m in moe_layers(model):
        assert m.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


# ----------------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize(
    "kw, ep, match",
    [
        (dict(top_k=5), 1, "top_k"),
        (dict(experts=6), 4, "divisible|split evenly"),
        (dict(capacity_factor=0.0), 1, "capacity_factor"),
        (dict(capacity_factor=-2.0), 2, "capacity_factor"),
        (dict(moe_groups=2), 4, "moe_groups"),
        (dict(router="relu"), 1, "router"),
    ],
)
def test_bad_configurations_fail_before_launch(kw, ep, match):
    with pytest.raises(ValueError, match=match):
        run_ep(CFG.replace(**kw), ep=ep, batch_size=8)  # raised in the caller: no rank was started


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(capacity_factor=0.0), dict(router="relu")])
def test_bad_layer_configurations(kw):
    with pytest.raises(ValueError):
        MoE(CFG.replace(**kw))
    with pytest.raises(ValueError, match="batch_size"):
        check_ep(CFG, ep=4, dp=1, batch_size=6)


# ----------------------------------------------------------------------------- expert parallel parity
def _case(ep, per_rank, cf):
    E = ep * per_rank
    return (
        f"{'dp2 x ' if ep == 2 else ''}ep{ep}, {per_rank} expert(s) per rank, CF={cf}",
        4 // ep,
        ep,
        CFG.replace(experts=E, top_k=min(2, E - 1), capacity_factor=cf),
    )


# (name, dp, ep, config): ep 2 (over a dp group of 4) and 4, 1 and 2 experts per rank, dropless and dropping
EP_CASES = [_case(ep, per_rank, cf) for ep in (2, 4) for per_rank in (1, 2) for cf in (float("inf"), 1.0)] + [
    (
        "dp2 x ep2, sigmoid router, shared expert, z-loss, aux-free",
        2,
        2,
        CFG.replace(
            experts=4, top_k=2, router="sigmoid", shared_expert=True, capacity_factor=1.25, z_loss=1e-3
        ),
    )
]
STEPS, GAMMA = 3, 0.01


def _ep_cases():
    out = []
    for name, dp, ep, cfg in EP_CASES:
        gamma = GAMMA if "aux-free" in name else 0.0
        trace.reset()
        with handed_to_backend() as log:
            run = train_moe(cfg, steps=STEPS, batch_size=8, gamma=gamma, mesh=Mesh(dp=dp, ep=ep), kind="sgd")
        run.events = [e for e in run.events if e.cat == "comm"]
        run.backend = [c for c in log if c.op == "all_to_all"]
        out.append(run)
    return out


@pytest.fixture(scope="module")
def ep_runs():
    return minipar.launch(_ep_cases, 4, timeout=120)


@functools.lru_cache(maxsize=None)
def _paper(i):
    name, _, _, cfg = EP_CASES[i]
    return train_paper(cfg, STEPS, batch_size=8, gamma=GAMMA if "aux-free" in name else 0.0, kind="sgd")


@pytest.mark.parametrize("i", range(len(EP_CASES)))
def test_expert_parallel_equals_the_papers_single_device_layer(ep_runs, i):
    """EP against a single-device loop over the MoE layer written from the papers (tests/_moe_reference.py):
    it runs neither minipar's MoE nor its dispatcher. Every gradient of the first backward (the router's
    included), the losses, the logits, the kept tokens, the dropped fraction and the balancing biases, and
    every parameter after 3 SGD steps."""
    name, dp, ep, cfg = EP_CASES[i]
    ref = _paper(i)
    runs = [r[i] for r in ep_runs]
    grads, params = {}, {}
    for r in runs:
        grads.update(r.first_grads)
        params.update(r.params)
    assert any(".router." in n for n in grads)
    assert_grads_match(grads, ref["first_grads"], what=name)
    assert max(abs(a - b) for a, b in zip(runs[0].losses, ref["losses"])) < 1e-5, name
    assert_params_match(params, ref["params"], what=name)
    for layer in range(len(ref["keep"])):  # the same tokens are dropped
        assert torch.equal(torch.cat([r.keep[layer] for r in runs]), ref["keep"][layer])
        assert all(torch.allclose(r.bias[layer], ref["bias"][layer]) for r in runs)
    assert runs[0].dropped == pytest.approx(ref["dropped"])
    if cfg.capacity_factor < 2:
        assert max(ref["dropped"]) > 0, "this case must drop tokens"
    if "aux-free" in name:
        assert ref["bias"][0].abs().sum() > 0


def test_all_to_all_bytes_handed_to_the_backend_are_the_rows_routing_sends(ep_runs):
    """Bytes each rank handed to all_to_all_single for other ranks (tests/_wire.py), in the last step, against
    what the papers' routing of the global batch says must move: dispatch sends this rank's kept choices for
    experts held elsewhere, combine sends back the other ranks' kept choices for its own experts; backward
    sends their transposes (layer by layer in reverse). Also: the trace's wire_bytes are those bytes."""
    for i, (name, dp, ep, cfg) in enumerate(EP_CASES):
        ref = _paper(i)
        per_rank_expert = cfg.experts // ep
        for rank, runs in enumerate(ep_runs):
            run, me, group = (
                runs[i],
                rank % ep,
                range(rank - rank % ep, rank - rank % ep + ep),
            )  # Mesh(dp, ep)
            calls = run.backend
            assert len(calls) == 4 * STEPS * cfg.layers
            assert [c.sent for c in calls] == [e.wire_bytes for e in run.events if e.name == "all_to_all"]
            last = calls[-4 * cfg.layers :]  # forward: dispatch, combine per layer; backward: in reverse

            def rows(shard, owner_is_me, layer):
                keep, chosen = (t.chunk(4)[shard] for t in (ref["keep"][layer], ref["chosen"][layer]))
                mine = (chosen // per_rank_expert) == me
                return int((keep & (mine if owner_is_me else ~mine)).sum()) * cfg.hidden * 4

            for layer in range(cfg.layers):
                dispatch = rows(rank, False, layer)
                combine = sum(rows(q, True, layer) for q in group if q != rank)
                assert (last[2 * layer].sent, last[2 * layer + 1].sent) == (dispatch, combine), (
                    name,
                    rank,
                    layer,
                )
                back = last[2 * cfg.layers :][2 * (cfg.layers - 1 - layer) :][:2]
                assert (back[0].sent, back[1].sent) == (dispatch, combine), (name, rank, layer)


def _uniform_dispatch(ep, T, k, h):
    """Every rank sends exactly T*k/ep rows to every rank: the formula's assumption."""
    Mesh(ep=ep)
    E = ep
    experts = torch.nn.ModuleDict({str(runtime.rank()): torch.nn.Identity()})
    x = torch.randn(T, h)
    index = (torch.arange(T)[:, None] + torch.arange(k)[None]) % E
    with handed_to_backend() as log:
        y, _ = dispatch_combine(
            x,
            index,
            torch.full((T, k), 1.0 / k),
            torch.ones(T, k, dtype=torch.bool),
            experts,
            E,
            ep,
            runtime.rank(),
            "ep",
        )
    return (y - x).abs().max().item(), [c.sent for c in log if c.op == "all_to_all"]


def test_uniform_all_to_all_matches_formula():
    """GShard Sec. 3.2 / Switch Sec. 2.2: T·k·h·(ep-1)/ep values leave each rank per all-to-all under uniform
    routing; measured from the rows handed to the backend, exactly."""
    T, k, h, ep = 16, 2, 8, 4
    for err, sent in minipar.launch(_uniform_dispatch, ep, ep, T, k, h):
        assert err < 1e-6  # identity experts: combine returns x
        assert sent == [a2a_formula(T, k, h, ep)] * 2
    assert a2a_formula(T, k, h, ep) == T * k * h * (ep - 1) / ep * 4


# ----------------------------------------------------------------------------- balancing
def test_aux_loss_free_balancing_fixes_a_skewed_start():
    cfg = GPTConfig(
        vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2, router="sigmoid", aux_alpha=0.0
    )
    free = train_moe(cfg, steps=60, batch_size=16, gamma=0.01, skew=1.0, seed=1)
    none = train_moe(cfg, steps=60, batch_size=16, gamma=0.0, skew=1.0, seed=1)
    assert none.imbalance()[0] == free.imbalance()[0] == 2.0  # k=2 of E=4: the maximum possible
    assert min(none.imbalance(10)) > 1.9  # left alone, it stays collapsed
    assert free.imbalance(10)[-1] < 1.2, free.imbalance(10)[-10:]
