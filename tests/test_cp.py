"""Context parallelism: ring attention (zigzag and contiguous) and Ulysses against full-sequence SDPA,
a whole GPT against the single-device reference, and bytes / FLOPs / memory against the formulas."""

import pytest
import torch
import torch.nn.functional as F
from _parity import assert_grads_match, assert_params_match
from _wire import handed_to_backend, total
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import minipar
from minipar import cp, runtime, trace
from minipar.activations import SavedActivations
from minipar.model import GPT, GPTConfig, SyntheticData, train_reference

B, H, S, D = 2, 4, 32, 8
CASES = [("ring", causal, layout) for causal in (True, False) for layout in cp.LAYOUTS]
CASES += [("ulysses", causal, "contiguous") for causal in (True, False)]


# ----------------------------------------------------------------------------- sharding
@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), chunk=st.integers(1, 4), layout=st.sampled_from(cp.LAYOUTS))
def test_shards_cover_the_sequence_once(size, chunk, layout):
    seq = chunk * size * (2 if layout == "zigzag" else 1)
    held = torch.cat([cp.sequence_positions(seq, r, size, layout) for r in range(size)])
    assert sorted(held.tolist()) == list(range(seq))
    if layout == "zigzag":  # rank r: chunk r then chunk 2·size-1-r
        assert cp.sequence_positions(seq, 0, size, layout)[-1].item() == seq - 1


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        cp.shard_sequence(torch.zeros(1, 1, 12, 1), 0, 4)
    with pytest.raises(ValueError, match="layout"):
        cp.shard_sequence(torch.zeros(1, 1, 8, 1), 0, 4, layout="striped")
    cfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32)
    with pytest.raises(ValueError, match="heads per tp rank must be divisible by cp=8"):
        cp.check_config(cfg, 8, "ulysses", "contiguous")
    with pytest.raises(ValueError, match="contiguous"):
        cp.check_config(cfg, 2, "ulysses", "zigzag")
    with pytest.raises(ValueError, match="try 36 or 42"):
        cp.check_config(cfg.replace(seq=40), 3, "ring", "zigzag")
    with pytest.raises(ValueError, match="method"):
        cp.check_config(cfg, 2, "tree")
    cp.check_config(cfg, 4, "ring", "zigzag")


# ----------------------------------------------------------------------------- attention parity
def _qkv(h_kv=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g) for h in (H, h_kv, h_kv, H)]  # q, k, v, dout


def _attention_errors(h_kv_cases):
    """On every rank: max |local - full SDPA| over output and dQ, dK, dV, for each case."""
    r, n = runtime.rank(), runtime.world_size()
    errs = {}
    for h_kv in h_kv_cases:
        q, k, v, dout = _qkv(h_kv)
        for method, causal, layout in CASES:
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=h_kv != H)
            want.backward(dout)
            mine = [cp.shard_sequence(t, r, n, layout).requires_grad_() for t in (q, k, v)]
            if method == "ring":
                out = cp.ring_attention(*mine, causal=causal, layout=layout)
            else:
                out = cp.ulysses_attention(*mine, causal=causal)
            out.backward(cp.shard_sequence(dout, r, n, layout))
            pairs = [(out, want)] + [(a.grad, b.grad) for a, b in zip(mine, full)]
            e = [(x - cp.shard_sequence(y, r, n, layout)).abs().max().item() for x, y in pairs]
            e.append((cp.unshard_sequence(out.detach(), n, layout) - want).abs().max().item())
            errs[(method, causal, layout, h_kv)] = max(e)
    x = cp.shard_sequence(q, r, n).requires_grad_()  # unshard's backward keeps this rank's slice
    (cp.unshard_sequence(x, n) * dout).sum().backward()
    errs["unshard_grad"] = (x.grad - cp.shard_sequence(dout, r, n)).abs().max().item()
    try:
        cp.ulysses_attention(*(cp.shard_sequence(t, r, n, "contiguous") for t in _qkv(1)[:3]))
        errs["gqa_reject"] = "no error"
    except ValueError as e:
        errs["gqa_reject"] = str(e)
    return errs


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_ulysses_match_full_sdpa(world):
    # GQA with 2 KV heads: ring handles it at any cp, Ulysses needs h_kv % cp == 0 (cp=2 here)
    per_rank = minipar.launch(_attention_errors, world, (H, 2) if world == 2 else (H,))
    for errs in per_rank:
        assert "repeat the KV heads" in errs.pop("gqa_reject")
        assert errs.pop("unshard_grad") == 0
        assert len(errs) == len(CASES) * (2 if world == 2 else 1)
        for case, e in errs.items():
            assert e < 1e-5, (world, case, e)


def test_ring_handles_gqa_at_cp4():
    def body():
        q, k, v, dout = _qkv(h_kv=1, seed=3)
        r = runtime.rank()
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True).backward(dout)
        mine = [cp.shard_sequence(t, r, 4).requires_grad_() for t in (q, k, v)]
        cp.ring_attention(*mine).backward(cp.shard_sequence(dout, r, 4))
        return max((a.grad - cp.shard_sequence(b.grad, r, 4)).abs().max().item() for a, b in zip(mine, full))

    assert max(minipar.launch(body, 4)) < 1e-5


# ----------------------------------------------------------------------------- a whole GPT
CFG = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=32)
SETUPS = [("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "contiguous")]


def _train_all():
    return {
        s: cp.train_rank(CFG, steps=3, batch_size=4, seed=0, method=s[0], layout=s[1], kind="sgd")
        for s in SETUPS
    }


@pytest.fixture(scope="module")
def reference():
    return train_reference(CFG, steps=1, batch_size=4).grads, train_reference(
        CFG, steps=3, batch_size=4, kind="sgd"
    )


def _assert_matches(res, reference, what):
    """The first backward's gradients (every rank's, all-reduced over cp), then losses and parameters after
    3 SGD steps (tests/_parity.py)."""
    first, ref = reference
    assert_grads_match(res["first_grads"], first, what=what)
    assert res["losses"] == pytest.approx(ref.losses, abs=1e-5), what
    assert_params_match(res["params"], dict(ref.model.named_parameters()), what=what)


@pytest.mark.parametrize("world", [2, 4])
def test_gpt_with_cp_matches_reference_gradients_and_sgd_parameters(world, reference):
    for rank, results in enumerate(minipar.launch(_train_all, world)):
        for setup, res in results.items():
            _assert_matches(res, reference, (world, setup, rank))


def _train_on_mesh():
    from minipar.mesh import Mesh

    mesh = Mesh(cp=2, dp=2)  # cp groups {0, 2} and {1, 3}: ring neighbours are not consecutive ranks
    return mesh.ranks("cp"), {s: cp.train_rank(CFG, 3, 4, 0, *s, group="cp", kind="sgd") for s in SETUPS[::2]}


def test_cp_over_a_mesh_axis(reference):
    for rank, (members, results) in enumerate(minipar.launch(_train_on_mesh, 4)):
        assert members == [rank % 2, rank % 2 + 2]
        for setup, res in results.items():
            _assert_matches(res, reference, (setup, rank))


# ----------------------------------------------------------------------------- bytes and FLOPs
def _measure_comm(h_kv):
    r, n = runtime.rank(), runtime.world_size()
    q, k, v, dout = _qkv(h_kv)
    out = {}
    for method, layout in (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "contiguous")):
        mine = [cp.shard_sequence(t, r, n, layout).requires_grad_() for t in (q, k, v)]
        fn = cp.ring_attention if method == "ring" else cp.ulysses_attention
        trace.reset()
        with handed_to_backend() as fwd, FlopCounterMode(display=False) as fwd_flops:
            y = fn(*mine, layout=layout) if method == "ring" else fn(*mine)
        traced = trace.events()
        with handed_to_backend() as bwd, FlopCounterMode(display=False) as bwd_flops:
            y.backward(cp.shard_sequence(dout, r, n, layout))
        op = "batch_p2p" if method == "ring" else "all_to_all"
        out[(method, layout)] = {  # bytes sent: from what was handed to the backend; FLOPs: counted
            "forward": total(fwd, op, "sent"),
            "backward": total(bwd, op, "sent"),
            "count": (sum(c.op == op for c in fwd), sum(c.op == op for c in bwd)),
            "flops": (fwd_flops.get_total_flops(), bwd_flops.get_total_flops()),
            "traced_flops": sum(e.flops for e in traced if e.cat == "compute"),
        }
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_and_flops_match_the_formulas(world):
    """Bytes from the tensors handed to the backend (tests/_wire.py), FLOPs from torch's FlopCounterMode
    (2mnk per matmul), each equal to its formula exactly."""
    h_kv = world  # GQA at cp=2, plain multi-head at cp=4
    per_rank = minipar.launch(_measure_comm, world, h_kv)
    ring_kv = cp.ring_bytes(B, h_kv, S, D, world)
    uly = cp.ulysses_bytes(B, H, S, D, world, h_kv=h_kv)
    for rank, m in enumerate(per_rank):
        for layout in cp.LAYOUTS:
            got = m[("ring", layout)]
            assert (got["forward"], got["backward"]) == (ring_kv["forward"], ring_kv["backward"])
            assert got["count"] == (world - 1, 2 * world - 1)  # one batched send/recv per ring step
            # forward: QKᵀ and PV, 4·b·h·c²·d per visited pair; backward: QKᵀ again, dO·Vᵀ, dS·K, dSᵀ·Q, Pᵀ·dO
            want = cp.ring_flops(B, H, S, D, world, rank, layout)
            assert got["flops"] == (want, want // 4 * 10), (layout, rank)
            assert got["traced_flops"] == want  # what the trace's spans say equals what was counted
        got = m[("ulysses", "contiguous")]
        # Ulysses' payload: Q, K, V, O each way; of each, the (cp-1)/cp for other ranks leaves this one
        assert (got["count"], got["forward"]) == ((4, 4), uly["forward"] * (world - 1) // world)
        assert got["backward"] == uly["backward"] * (world - 1) // world
    # zigzag: every rank the same causal work; contiguous: rank r does r+1 blocks, the last cp times the first
    zig = [m[("ring", "zigzag")]["flops"][0] for m in per_rank]
    con = [m[("ring", "contiguous")]["flops"][0] for m in per_rank]
    assert len(set(zig)) == 1
    assert zig[0] * 2 * (world + 1) == sum(con) / world * (
        2 * world + 1
    )  # smaller diagonal blocks waste less
    assert con == [con[0] * (r + 1) for r in range(world)] and max(con) / min(con) == world
    assert max(con) / (sum(con) / world) == pytest.approx(2 * world / (world + 1))


# ----------------------------------------------------------------------------- activation memory
def _activation_bytes(seq):
    r, n = runtime.rank(), runtime.world_size()
    cfg = GPTConfig(vocab=64, seq=seq, layers=2, heads=4, hidden=64)
    model = cp.parallelize_attention(GPT(cfg, 0), "ring", "zigzag")
    x, y, pos = cp.local_batch(*SyntheticData(64, seq).batch(0, 1), r, n, "zigzag")
    with SavedActivations(model) as meter:
        model(x, y, pos=pos)
    return meter.bytes


def test_activation_memory_falls_as_one_over_cp():
    seq = 1024  # the notebook's longest sequence
    one = minipar.launch(_activation_bytes, 1, seq)[0]
    four = minipar.launch(_activation_bytes, 4, seq)
    assert max(four) <= 0.35 * one, (four, one)
    assert max(four) >= 0.2 * one  # sanity: the meter sees the activations at all
