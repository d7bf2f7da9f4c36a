"""ZeRO-1/2/3, offload, mixed precision: parity with the single-device loop, memory and
communication against the ZeRO paper's formulas, and our ZeRO-3 against FSDP2."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import launch, trace
from minipar.dp import train_ddp
from minipar.model import GPT, GPTConfig, train_reference
from minipar.plan import model_state_bytes
from minipar.precision import MixedPrecision
from minipar.zero import FSDP_NAMES, ZeRO, stage_of, train_zero

from _peers import train_torch_peer

# hidden=27, vocab=61: every unit has an odd number of parameters, so no unit divides
# by 2 or 4 ranks and every flat buffer is padded.
ODD = GPTConfig(vocab=61, seq=16, layers=2, heads=3, hidden=27)
EVEN = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)
ENGINES = ("ddp", 1, 2, 3, "3+offload")


def _train(cfg, engine, **kw):
    if engine == "ddp":
        return train_ddp(cfg, **kw)
    if engine == "3+offload":
        return train_zero(cfg, 3, offload=True, **kw)
    return train_zero(cfg, engine, **kw)


def _grid(combos):
    """Every (cfg, engine, accum, recompute) of `combos` inside one launch: one fork per world size."""
    return {(cfg.hidden, e, acc, rc): _train(cfg, e, steps=5, batch_size=8, grad_accum=acc, recompute=rc)
            for cfg, acc, rc in combos for e in ENGINES}


GRIDS = {
    2: [(ODD, 1, None), (ODD, 2, None), (ODD, 1, "full"), (ODD, 2, "selective"), (EVEN, 1, None)],
    4: [(ODD, 1, None), (ODD, 2, "full"), (ODD, 1, "selective"), (EVEN, 2, None)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_every_stage_matches_the_single_device_loop(world):
    results = launch(_grid, world, GRIDS[world], timeout=120)
    refs = {}
    for (hidden, engine, acc, rc), res in results[0].items():
        cfg = ODD if hidden == ODD.hidden else EVEN
        if (hidden, acc) not in refs:
            refs[hidden, acc] = train_reference(cfg, 5, 8, 0, grad_accum=acc)
        ref = refs[hidden, acc]
        what = f"{engine} world={world} accum={acc} recompute={rc} hidden={hidden}"
        assert res["losses"] == pytest.approx(ref.losses, abs=1e-5), what
        assert ref.losses[-1] < ref.losses[0] - 0.05  # the run trains, so the comparison means something
        for name, p in ref.model.named_parameters():
            # every rank ends with the same full parameters as the reference
            for r in range(world):
                got = results[r][hidden, engine, acc, rc]["params"][name]
                assert (got - p.detach()).abs().max().item() < 1e-5, f"{what} {name} rank {r}"


def _memory_and_comm():
    out = {}
    for e in ENGINES:
        trace.reset()
        res = _train(ODD, e, steps=3, batch_size=8)
        comm = [ev for ev in trace.events() if ev.cat == "comm"]
        out[e] = dict(memory=res["memory"], num_params=res["num_params"],
                      padded=res.get("padded_params", res["num_params"]),
                      wire=sum(ev.wire_bytes for ev in comm) / 3, ops=sorted({ev.name for ev in comm}))
    for stage in (1, 2, 3):
        out["bf16", stage] = train_zero(ODD, stage, steps=2, precision=MixedPrecision("bf16"))["memory"]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_model_state_bytes_and_traffic_match_the_zero_formulas(world):
    res = launch(_memory_and_comm, world, timeout=120)[0]
    psi = res["ddp"]["num_params"]
    for e in ENGINES:
        m, padded = res[e]["memory"], res[e]["padded"]
        stage = 0 if e == "ddp" else 3 if e == "3+offload" else e
        # fp32 AdamW: 4-byte parameters and gradients, K = 8 (momentum + variance; the
        # parameter is its own master). Offload keeps a separate fp32 master on the host: K = 12.
        k = 12 if e == "3+offload" else 8
        measured = m["params"] + m["grads"] + m["optimizer"]
        assert measured == model_state_bytes(padded, world, stage, k=k, param_bytes=4, grad_bytes=4), e
        assert padded - psi == (0 if e == "ddp" else m["padding"])
        assert 0 < padded - psi < world * 4 or e == "ddp"  # at most N-1 elements per unit
    off = res["3+offload"]["memory"]
    assert off["where"] == "host" and off["params"] + off["grads"] == 8 * res["3+offload"]["padded"] // world
    for stage in (1, 2, 3):  # bf16 compute, fp32 masters: the paper's own 2 + 2 + 12
        m = res["bf16", stage]
        padded = res[stage]["padded"]
        assert m["params"] + m["grads"] + m["optimizer"] == model_state_bytes(padded, world, stage)
    ddp = res["ddp"]["wire"]
    assert res["ddp"]["ops"] == ["all_reduce"]
    assert res[3]["ops"] == ["all_gather", "reduce_scatter"]
    assert res[3]["wire"] / ddp == pytest.approx(1.5, rel=0.02)  # 3Ψ vs 2Ψ
    assert res[1]["wire"] / ddp == pytest.approx(1.0, rel=0.02)  # 2Ψ, just split in two
    assert res[2]["wire"] / ddp == pytest.approx(1.0, rel=0.02)


def _mixed_precision():
    out = {"bf16": train_zero(ODD, 3, steps=12, precision=MixedPrecision("bf16", reduce_dtype="fp32"))}
    fp16 = MixedPrecision("fp16", loss_scale="dynamic")
    out["overflow"] = train_zero(ODD, 2, steps=4, precision=fp16, inject_overflow_at=3)
    out["three_steps"] = train_zero(ODD, 2, steps=3, precision=fp16)
    out["fp16"] = train_zero(ODD, 1, steps=12, precision=fp16)
    return out


def test_mixed_precision_trains_and_fp16_skips_an_overflowed_step():
    res = launch(_mixed_precision, 2)
    bf16 = res[0]["bf16"]["losses"]
    assert bf16[-1] < bf16[0] - 0.2 and res[0]["fp16"]["losses"][-1] < res[0]["fp16"]["losses"][0] - 0.2
    hist = res[0]["overflow"]["scale_history"]
    assert [skipped for _, skipped in hist] == [False, False, False, True]
    # the step after the overflow runs at half the scale (the scaler's state after update)
    assert hist[3][0] == 2.0**16 and res[0]["overflow"]["scale_history"] == res[1]["overflow"]["scale_history"]
    # step 3 was skipped on every rank: the parameters are exactly those after 3 steps
    for r in range(2):
        after, three = res[r]["overflow"]["params"], res[r]["three_steps"]["params"]
        assert all(torch.equal(after[n], three[n]) for n in three)


def test_the_overflow_halves_the_scale():
    from minipar.precision import DynamicLossScaler
    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    s.update(True)
    assert s.scale_value == 4.0
    s.update(False), s.update(False)
    assert s.scale_value == 8.0 and s.history == [(8.0, True), (4.0, False), (4.0, False)]


def _ours_and_fsdp2(steps=5, batch=8, seed=0):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ours = train_zero(ODD, 3, steps=steps, batch_size=batch, seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(seed)
    model = GPT(ODD, seed)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train_torch_peer(model, ODD, steps, batch, seed)
    return ours, losses, {n: p.full_tensor() for n, p in model.named_parameters()}


def test_our_zero3_matches_fsdp2_fully_shard():
    ours, losses, params = launch(_ours_and_fsdp2, 2, timeout=120)[0]
    assert ours["losses"] == pytest.approx(losses, abs=1e-6)
    for n, p in params.items():
        assert (ours["params"][n] - p).abs().max().item() < 1e-6, n


def _zero3_schedule():
    from minipar.dp import train_steps
    model = GPT(ODD, 0)
    z = ZeRO(model, 3)
    trace.reset()
    train_steps(z, z.step, ODD, 2, 8, spans=False)
    unit = max(u.padded for u in z.units) * 4
    return trace.events(), z.gathered_log, unit, len(z.units)


def test_zero3_gathers_before_use_frees_after_and_prefetches():
    evs, log, unit_bytes, units = launch(_zero3_schedule, 2)[0]
    gathers = [e for e in evs if e.name == "all_gather"]
    assert len(gathers) == 2 * 2 * units  # per step: once for forward, once for backward
    assert len([e for e in evs if e.name == "reduce_scatter"]) == 2 * units
    # never more than two units' full parameters alive at once: the current one and the prefetch
    assert max(b for _, b in log) <= 2 * unit_bytes and log[-1][1] == 0
    fwd = {e.name: e for e in evs if e.cat == "compute" and e.name.startswith("F")}
    # the gather of block 1 (unit 2) is issued while block 0 (unit 1) computes
    assert any(fwd["F1"].start < g.start < fwd["F1"].end for g in gathers)


def test_bad_configurations_raise_clear_errors():
    assert [stage_of(s) for s in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", 1)] == [3, 2, 0, 1]
    assert FSDP_NAMES["FULL_SHARD"] == 3
    with pytest.raises(ValueError, match="DDP"):
        ZeRO(GPT(ODD), 0)
    with pytest.raises(ValueError, match="HYBRID"):
        stage_of("HYBRID")
    with pytest.raises(ValueError, match="loss_scale"):
        MixedPrecision("fp16")
    with pytest.raises(ValueError, match="dtype"):
        MixedPrecision("int8")
    with pytest.raises(ValueError, match="no unit"):
        m = GPT(ODD)
        ZeRO(m, 3, units=[("blocks", list(m.blocks))])


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4),
       n=st.integers(1, 5), stage=st.sampled_from([1, 2, 3]))
def test_flat_shards_tile_the_parameters_with_zero_padding(sizes, n, stage):
    from minipar.zero import Unit
    torch.manual_seed(0)
    modules = [torch.nn.Linear(a, b) for a, b in sizes]
    want = torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])
    shards = []
    for r in range(n):
        copies = [torch.nn.Linear(a, b) for a, b in sizes]
        for c, m in zip(copies, modules):
            c.load_state_dict(m.state_dict())
        u = Unit(0, "u", copies, n, r, stage, MixedPrecision())
        assert u.padded % n == 0 and 0 <= u.padded - u.numel < n and u.numel == want.numel()
        shards.append(u.shard.clone())
        if stage < 3:  # the module's parameters are views into the flat buffer
            assert copies[0].weight.untyped_storage().data_ptr() == u.flat.untyped_storage().data_ptr()
    flat = torch.cat(shards)
    assert torch.equal(flat[:want.numel()], want) and not flat[want.numel():].any()


class _SometimesB(torch.nn.Module):
    """One unit whose second layer only rank 0 uses: rank 1 gets no gradient for it (an MoE
    expert without tokens)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)

    def forward(self, x, use_b):
        h = self.a(x)
        return h + self.b(h) if use_b else h


def _late_unit(stage):
    import copy

    import torch.distributed as dist
    from minipar import comm
    torch.manual_seed(0)
    model = _SometimesB()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5)
    use_b = dist.get_rank() == 0
    z = ZeRO(model, stage, units=[("m", [model])], late={"m"})
    z.zero_grad()
    z.backward(model(x, use_b).sum())
    ref(x, use_b).sum().backward()
    want = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ref.parameters()])
    want = comm.all_reduce(want, op="avg")
    u = z.units[0]
    want = torch.cat([want, want.new_zeros(u.padded - u.numel)]).chunk(2)[comm.local_rank()]
    return (z.local_grads()[0] - want).abs().max().item()


@pytest.mark.parametrize("stage", [2, 3])
def test_late_unit_reduces_when_a_rank_has_no_gradient_for_part_of_it(stage):
    """ZeRO-2/3 reduce a unit when its last gradient arrives; a rank whose expert got no tokens never
    gets there. A `late` unit reduces at the end of backward on every rank instead (missing = 0)."""
    assert max(launch(_late_unit, 2, stage, timeout=30)) < 1e-7
