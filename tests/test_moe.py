"""Mixture of experts and expert parallelism: routing, capacity, losses, balancing, EP parity."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minipar
from minipar import runtime, trace
from minipar.ep import a2a_formula, check_ep, dispatch_combine, run_ep, train_moe
from minipar.mesh import Mesh
from minipar.model import GPT, GPTConfig, MLP, train_reference
from minipar.moe import (MoE, assign_slots, capacity, moe_layers, route, router_z_loss, switch_aux_loss,
                         update_bias)

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
    assert capacity(64, 4, 2, 1.25) == 40                 # ceil(64*2*1.25/4)
    assert capacity(10, 3, 1, 1.0) == 4                   # ceil(10/3)
    assert capacity(8, 4, 1, 1.0, min_capacity=5) == 5
    assert capacity(64, 4, 2, float("inf")) == 64         # dropless: every token fits in any expert


@pytest.mark.parametrize("args, match", [((16, 4, 5, 1.0), "top_k"), ((16, 4, 1, 0.0), "capacity_factor"),
                                         ((16, 4, 1, -1.0), "capacity_factor")])
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
@given(T=st.integers(1, 24), E=st.integers(1, 6), k=st.integers(1, 3), C=st.integers(0, 10), seed=st.integers(0, 99))
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
    balanced = torch.arange(T).remainder(E)[:, None]            # first choices spread evenly
    assert switch_aux_loss(uniform, balanced, alpha).item() == pytest.approx(alpha, rel=1e-6)
    collapsed = F.one_hot(torch.zeros(T, dtype=torch.long), E).float()
    assert switch_aux_loss(collapsed, torch.zeros(T, 1, dtype=torch.long), alpha).item() == pytest.approx(alpha * E)
    # f comes from the first choice only, and groups average
    two = torch.stack([balanced[:, 0], (balanced[:, 0] + 1) % E], -1)
    assert switch_aux_loss(uniform, two, alpha).item() == pytest.approx(alpha, rel=1e-6)
    grouped = switch_aux_loss(torch.stack([uniform, collapsed]), torch.stack([balanced, torch.zeros_like(balanced)]))
    assert grouped.item() == pytest.approx((alpha + alpha * E) / 2, rel=1e-6)


def test_router_z_loss_and_routers():
    assert router_z_loss(torch.zeros(5, 4), 1e-3).item() == pytest.approx(1e-3 * math.log(4) ** 2)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    probs, index, w = route(logits, 1, "softmax")
    assert torch.equal(index[:, 0], logits.argmax(-1)) and torch.allclose(w[:, 0], probs.max(-1).values)
    probs, index, w = route(logits, 2, "sigmoid", bias=torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert (index == 3).any(-1).all()                           # the bias forces expert 3 into every top-2
    assert torch.allclose(w.sum(-1), torch.ones(6)) and torch.allclose(probs.sum(-1), torch.ones(6))
    s = torch.sigmoid(logits)
    assert torch.allclose(w, s.gather(-1, index) / s.gather(-1, index).sum(-1, keepdim=True))  # bias not in weights


# ----------------------------------------------------------------------------- the layer, single device
def _naive_moe(moe, x):
    """y_t = sum over kept choices of g * expert(x_t), one token at a time (no permutation)."""
    cfg = moe.cfg
    probs, index, w = route(moe.router(x), cfg.top_k, cfg.router, moe.expert_bias)
    C = capacity(x.shape[0], cfg.experts, cfg.top_k, cfg.capacity_factor, cfg.min_capacity)
    keep = _naive_keep(index, cfg.experts, C)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(cfg.top_k):
            if keep[t, j]:
                y[t] += w[t, j] * moe.experts[str(int(index[t, j]))](x[t:t + 1])[0]
    return y + (moe.shared(x) if moe.shared is not None else 0), keep


@pytest.mark.parametrize("kw", [dict(top_k=1, capacity_factor=1.0), dict(top_k=2, capacity_factor=0.75),
                                dict(top_k=2, router="sigmoid", shared_expert=True),
                                dict(top_k=1, capacity_factor=0.5, shared_expert=True)])
def test_moe_layer_equals_token_by_token_sum(kw):
    cfg = CFG.replace(moe_groups=1, **kw)
    moe = GPT(cfg, seed=3).blocks[0].mlp
    x = torch.randn(40, cfg.hidden, generator=torch.Generator().manual_seed(1))
    y = moe(x)
    want, keep = _naive_moe(moe, x)
    assert torch.allclose(y, want, atol=1e-6)
    assert torch.equal(moe.stats["keep"], keep)
    if cfg.capacity_factor < 1:
        dropped = ~keep.any(-1)                                  # every choice dropped: residual only
        assert dropped.any() or cfg.top_k > 1
        shared = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
        assert torch.allclose(y[dropped], shared[dropped], atol=1e-6)
        assert moe.stats["dropped"] == int((~keep).sum()) > 0


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
    assert all(torch.equal(ref.grads[n], mine.grads[n]) for n in ref.grads) and set(ref.grads) == set(mine.grads)


def test_update_bias_moves_against_load():
    model = GPT(CFG.replace(experts=4), seed=0)
    update_bias(model, 0.1, loads=[torch.tensor([10, 2, 4, 4])] * 2)
    for m in moe_layers(model):
        assert m.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


# ----------------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize("kw, ep, match", [(dict(top_k=5), 1, "top_k"), (dict(experts=6), 4, "divisible|split evenly"),
                                           (dict(capacity_factor=0.0), 1, "capacity_factor"),
                                           (dict(capacity_factor=-2.0), 2, "capacity_factor"),
                                           (dict(moe_groups=2), 4, "moe_groups"), (dict(router="relu"), 1, "router")])
def test_bad_configurations_fail_before_launch(kw, ep, match):
    with pytest.raises(ValueError, match=match):
        run_ep(CFG.replace(**kw), ep=ep, batch_size=8)     # raised in the caller: no rank was started


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(capacity_factor=0.0), dict(router="relu")])
def test_bad_layer_configurations(kw):
    with pytest.raises(ValueError):
        MoE(CFG.replace(**kw))
    with pytest.raises(ValueError, match="batch_size"):
        check_ep(CFG, ep=4, dp=1, batch_size=6)


# ----------------------------------------------------------------------------- expert parallel parity
def _case(ep, per_rank, cf):
    E = ep * per_rank
    return (f"{'dp2 x ' if ep == 2 else ''}ep{ep}, {per_rank} expert(s) per rank, CF={cf}", 4 // ep, ep,
            CFG.replace(experts=E, top_k=min(2, E - 1), capacity_factor=cf))


# (name, dp, ep, config): ep 2 (over a dp group of 4) and 4, 1 and 2 experts per rank, dropless and dropping
EP_CASES = [_case(ep, per_rank, cf) for ep in (2, 4) for per_rank in (1, 2) for cf in (float("inf"), 1.0)] + [
    ("dp2 x ep2, sigmoid router, shared expert, z-loss, aux-free", 2, 2,
     CFG.replace(experts=4, top_k=2, router="sigmoid", shared_expert=True, capacity_factor=1.25, z_loss=1e-3))]
STEPS, GAMMA = 3, 0.01


def _ep_cases():
    out = []
    for name, dp, ep, cfg in EP_CASES:
        gamma = GAMMA if "aux-free" in name else 0.0
        trace.reset()
        run = train_moe(cfg, steps=STEPS, batch_size=8, gamma=gamma, mesh=Mesh(dp=dp, ep=ep))
        run.events = [e for e in run.events if e.cat == "comm"]
        out.append(run)
    return out


@pytest.fixture(scope="module")
def ep_runs():
    return minipar.launch(_ep_cases, 4, timeout=120)


@pytest.mark.parametrize("i", range(len(EP_CASES)))
def test_expert_parallel_equals_single_device(ep_runs, i):
    name, dp, ep, cfg = EP_CASES[i]
    ref = train_moe(cfg, steps=STEPS, batch_size=8, gamma=GAMMA if "aux-free" in name else 0.0)
    runs = [r[i] for r in ep_runs]
    assert max(abs(a - b) for a, b in zip(runs[0].losses, ref.losses)) < 1e-5, name
    assert torch.allclose(torch.cat([r.logits for r in runs]), ref.logits, atol=1e-5)
    grads = {}
    for r in runs:
        grads.update(r.grads)
    assert set(grads) == set(ref.grads) and any(".router." in n for n in grads)
    for n, g in grads.items():
        assert torch.allclose(g, ref.grads[n], atol=1e-5), (name, n, (g - ref.grads[n]).abs().max())
    for layer in range(len(ref.keep)):                            # the same tokens are dropped
        assert torch.equal(torch.cat([r.keep[layer] for r in runs]), ref.keep[layer])
        assert all(torch.allclose(r.bias[layer], ref.bias[layer]) for r in runs)
    assert runs[0].dropped == pytest.approx(ref.dropped)
    if cfg.capacity_factor < 2:
        assert max(ref.dropped) > 0, "this case must drop tokens"
    if "aux-free" in name:
        assert ref.bias[0].abs().sum() > 0


def test_all_to_all_bytes_from_the_trace(ep_runs):
    """Every all-to-all's traced bytes equal the rows it moved; 4 per MoE layer and step."""
    for i, (name, dp, ep, cfg) in enumerate(EP_CASES):
        for rank, runs in enumerate(ep_runs):
            run = runs[i]
            a2a = [e for e in run.events if e.name == "all_to_all"]
            assert len(a2a) == 4 * STEPS * cfg.layers
            last = a2a[-4 * cfg.layers:]                           # last step: F dispatch, combine per layer
            for layer, stats in enumerate(run.stats):
                dispatch, sent = last[2 * layer], stats["send_splits"]
                assert dispatch.bytes == sum(sent) * cfg.hidden * 4
                assert dispatch.wire_bytes == (sum(sent) - sent[rank % ep]) * cfg.hidden * 4  # ep index = rank % ep


def _uniform_dispatch(ep, T, k, h):
    """Every rank sends exactly T*k/ep rows to every rank: the formula's assumption."""
    Mesh(ep=ep)
    E = ep
    experts = torch.nn.ModuleDict({str(runtime.rank()): torch.nn.Identity()})
    x = torch.randn(T, h)
    index = (torch.arange(T)[:, None] + torch.arange(k)[None]) % E
    trace.reset()
    y, _ = dispatch_combine(x, index, torch.full((T, k), 1.0 / k), torch.ones(T, k, dtype=torch.bool),
                            experts, E, ep, runtime.rank(), "ep")
    return (y - x).abs().max().item(), [e.wire_bytes for e in trace.events() if e.name == "all_to_all"]


def test_uniform_all_to_all_matches_formula():
    T, k, h, ep = 16, 2, 8, 4
    for err, wires in minipar.launch(_uniform_dispatch, ep, ep, T, k, h):
        assert err < 1e-6                                          # identity experts: combine returns x
        assert wires == [a2a_formula(T, k, h, ep)] * 2
    assert a2a_formula(T, k, h, ep) == T * k * h * (ep - 1) / ep * 4


# ----------------------------------------------------------------------------- balancing
def test_aux_loss_free_balancing_fixes_a_skewed_start():
    cfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32, experts=4, top_k=2, router="sigmoid",
                    aux_alpha=0.0)
    free = train_moe(cfg, steps=60, batch_size=16, gamma=0.01, skew=1.0, seed=1)
    none = train_moe(cfg, steps=60, batch_size=16, gamma=0.0, skew=1.0, seed=1)
    assert none.imbalance()[0] == free.imbalance()[0] == 2.0    # k=2 of E=4: the maximum possible
    assert min(none.imbalance(10)) > 1.9                          # left alone, it stays collapsed
    assert free.imbalance(10)[-1] < 1.2, free.imbalance(10)[-10:]
