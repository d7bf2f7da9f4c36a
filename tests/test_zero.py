"""ZeRO-1/2/3, offload, mixed precision: parity with the single-device loop, memory and
communication against the ZeRO paper's formulas, and our ZeRO-3 against FSDP2."""

import pytest
import torch
from _parity import assert_grads_match, assert_moved, assert_params_match, grad_errors, grad_scales
from _peers import full_params, train_torch_peer
from _wire import handed_to_backend, total
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import comm, launch, trace
from minipar.dp import train_ddp, train_steps
from minipar.model import GPT, GPTConfig, make_optimizer, train_reference
from minipar.plan import model_state_bytes
from minipar.precision import MixedPrecision
from minipar.zero import FSDP_NAMES, ZeRO, stage_of, train_zero

# hidden=27, vocab=61: every unit has an odd number of parameters, so no unit divides
# by 2 or 4 ranks and every flat buffer is padded.
ODD = GPTConfig(vocab=61, seq=16, layers=2, heads=3, hidden=27)
EVEN = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)
ENGINES = ("ddp", 1, 2, 3, "3+offload")


def _train(cfg, engine, **kw):
    if engine == "ddp":
        kw.pop("capture", None)  # DDP returns its (unsharded) gradients anyway
        return train_ddp(cfg, **kw)
    if engine == "3+offload":
        return train_zero(cfg, 3, offload=True, **kw)
    return train_zero(cfg, engine, **kw)


STEPS = 3


def _grid(combos):
    """Every (cfg, engine, accum, recompute) of `combos` inside one launch: one fork per world size.
    SGD: the purpose is the gradient and the parameters (see _parity.py)."""
    return {
        (cfg.hidden, e, acc, rc): _train(
            cfg, e, steps=STEPS, batch_size=8, grad_accum=acc, recompute=rc, capture=True, kind="sgd"
        )
        for cfg, acc, rc in combos
        for e in ENGINES
    }


GRIDS = {
    2: [(ODD, 1, None), (ODD, 2, None), (ODD, 1, "full"), (ODD, 2, "selective"), (EVEN, 1, None)],
    4: [(ODD, 1, None), (ODD, 2, "full"), (ODD, 1, "selective"), (EVEN, 2, None)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_every_stage_matches_the_single_device_gradients_and_sgd_parameters(world):
    """DDP and ZeRO-1/2/3 (+ CPU offload): every gradient of the first backward (averaged over the
    ranks, gathered to full shape), the losses, and every rank's parameters after 3 SGD steps."""
    results = launch(_grid, world, GRIDS[world], timeout=120)
    refs = {}
    for (hidden, engine, acc, rc), res in results[0].items():
        cfg = ODD if hidden == ODD.hidden else EVEN
        if (hidden, acc) not in refs:
            refs[hidden, acc] = (
                train_reference(cfg, 1, 8, 0, grad_accum=acc).grads,
                train_reference(cfg, STEPS, 8, 0, grad_accum=acc, kind="sgd"),
            )
        first, ref = refs[hidden, acc]
        what = f"{engine} world={world} accum={acc} recompute={rc} hidden={hidden}"
        assert_grads_match(res["first_grads"], first, what=what)
        assert res["losses"] == pytest.approx(ref.losses, abs=1e-5), what
        want = dict(ref.model.named_parameters())
        assert_moved(want, GPT(cfg, 0))  # the steps moved the model far beyond the bound below
        for r in range(world):  # every rank ends with the same full parameters as the reference
            assert_params_match(results[r][hidden, engine, acc, rc]["params"], want, what=f"{what} rank {r}")


def _memory_and_comm():
    out = {}
    for e in ENGINES:
        trace.reset()
        with handed_to_backend() as log:
            res = _train(ODD, e, steps=3, batch_size=8)
        out[e] = dict(
            memory=res["memory"],
            num_params=res["num_params"],
            padded=res.get("padded_params", res["num_params"]),
            ops=sorted({ev.name for ev in trace.events() if ev.cat == "comm"}),
            backend={
                op: total(log, op) for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
            },
        )
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
    # Traffic: the bytes handed to the backend over 3 steps, exactly (fp32: 4 bytes per element). Every run
    # also averages its logged loss (one float per step) and DDP broadcasts the initial parameters once.
    P, loss = 4 * res[3]["padded"], 3 * 4
    assert res["ddp"]["ops"] == ["all_reduce"]
    assert res["ddp"]["backend"] == dict(
        all_reduce=3 * 4 * psi + loss, all_gather=0, reduce_scatter=0, broadcast=4 * psi
    )
    for e in (1, 2):  # one reduce-scatter of the gradients and one all-gather of the parameters per step
        assert res[e]["backend"] == dict(
            all_reduce=loss, all_gather=3 * P, reduce_scatter=3 * P, broadcast=0
        ), e
    for e in (
        3,
        "3+offload",
    ):  # two all-gathers per step (forward, backward), + full_parameters' one at the end
        assert res[e]["ops"] == ["all_gather", "reduce_scatter"]
        assert res[e]["backend"] == dict(
            all_reduce=loss, all_gather=3 * 2 * P + P, reduce_scatter=3 * P, broadcast=0
        ), e
    # ZeRO's 2Ψ vs 3Ψ (Rajbhandari et al. 2020, sec. 7): a ring all-reduce puts 2(N-1)/N of its payload on
    # the wire, an all-gather or a reduce-scatter (N-1)/N. From the measured payloads of the 3 steps:
    ddp_wire = 2 * (res["ddp"]["backend"]["all_reduce"] - loss)
    z3 = res[3]["backend"]
    assert (z3["all_gather"] - P + z3["reduce_scatter"]) / ddp_wire == pytest.approx(1.5, rel=0.02)
    z1 = res[1]["backend"]
    assert (z1["all_gather"] + z1["reduce_scatter"]) / ddp_wire == pytest.approx(1.0, rel=0.02)


# Unit roundoff u (half an ulp at 1): bf16 keeps 8 significant bits, fp16 11. The first step's gradients
# pass through some ten roundings per layer (weights, activations, GEMM outputs, their gradients) whose
# errors add: measured 5-7 u (max over tensors, relative to each tensor's scale) on ODD under
# ATEN_CPU_CAPABILITY=default and avx2 alike (bf16 2.6e-2, fp16 2.8e-3). The bound is 16 u.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
GROWTH = 16


def _mixed_precision():
    return {
        "bf16": train_zero(ODD, 3, steps=STEPS, precision=MixedPrecision("bf16"), capture=True, kind="sgd"),
        "fp16": train_zero(
            ODD,
            1,
            steps=STEPS,
            precision=MixedPrecision("fp16", loss_scale="dynamic"),
            capture=True,
            kind="sgd",
        ),
    }


def test_bf16_and_fp16_with_loss_scaling_match_fp32_within_their_precision():
    """16-bit compute (bf16 under ZeRO-3; fp16 with dynamic loss scaling under ZeRO-1), fp32 masters: the
    first step's gradients, as the optimizer applies them (unscaled), within 16 u of the fp32 reference;
    the parameters after 3 SGD steps within 2 u of their scale (the fp32 masters start from the 16-bit
    copy of the initial weights, and the result is that of the masters rounded to 16 bits: two roundings
    of at most u each, or of half fp16's subnormal spacing 2^-24 near zero) plus what the gradients' error
    moved them (3 steps x lr x 16 u x the gradient's scale, twice for the later steps' gradients); the
    losses (means of many terms) within u of their size."""
    res = launch(_mixed_precision, 2)
    first = train_reference(ODD, 1, 8).grads
    ref = train_reference(ODD, STEPS, 8, kind="sgd")
    lr, scale = make_optimizer(ref.model.parameters(), kind="sgd").defaults["lr"], grad_scales(first)
    for name, u in UNIT_ROUNDOFF.items():
        for r in range(2):
            out = res[r][name]
            assert_grads_match(out["first_grads"], first, tol=GROWTH * u, what=f"{name} rank {r}")
            assert out["losses"] == pytest.approx(ref.losses, abs=u * max(ref.losses)), name
            for n, p in ref.model.named_parameters():
                bound = 2 * u * p.abs().max().item() + 2.0**-24 + 2 * STEPS * lr * GROWTH * u * scale[n]
                assert (out["params"][n] - p.detach()).abs().max().item() <= bound, (name, r, n)
        errs = grad_errors(res[0][name]["first_grads"], first)
        assert max(errs.values()) > u / 4, f"{name}: no rounding visible; did the run compute in {name}?"


def _overflow_then_the_halved_scale(steps=4, overflow_at=1):
    """fp16 ZeRO-2 with an inf injected into rank 0's gradient at step 1. Each step records the gradient as
    backward left it and as the optimizer got it: their ratio is the scale S that step used (S is a power
    of two, so unscaling is exact); and the parameter shards after it."""
    torch.manual_seed(0)
    z = ZeRO(GPT(ODD, 0), 2, precision=MixedPrecision("fp16", loss_scale="dynamic"))
    log, apply = [], z.apply

    def measured_apply(grads):
        before = [g.float().clone() for g in grads]
        stepped = apply(grads)
        after = [g.float().clone() for g in grads]
        finite = [(b[a.isfinite()], a[a.isfinite()]) for b, a in zip(before, after)]
        scale = max(b.abs().max().item() for b, _ in finite) / max(a.abs().max().item() for _, a in finite)
        log.append(dict(scale=scale, stepped=stepped, shards=[u.shard.clone() for u in z.units]))
        return stepped

    def inject(step):
        if step == overflow_at and comm.local_rank() == 0:
            z.local_grads()[0][0] = float("inf")

    z.apply = measured_apply
    train_steps(z, z.step, ODD, steps, 8, on_backward=inject)
    return log, z.scaler.history


def test_the_step_after_an_overflow_uses_the_halved_scale():
    for log, hist in launch(_overflow_then_the_halved_scale, 2):
        # measured from the gradients: 2^16 until the overflow, half of it from the next step on
        assert [e["scale"] for e in log] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
        assert [e["stepped"] for e in log] == [True, False, True, True]  # every rank skipped step 1
        assert hist == [(2.0**16, False), (2.0**16, True), (2.0**15, False), (2.0**15, False)]
        assert all(
            torch.equal(a, b) for a, b in zip(log[1]["shards"], log[0]["shards"])
        )  # skipped: unchanged
        assert not all(
            torch.equal(a, b) for a, b in zip(log[2]["shards"], log[1]["shards"])
        )  # the next one steps


def test_the_overflow_halves_the_scale():
    from minipar.precision import DynamicLossScaler

    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    s.update(True)
    assert s.scale_value == 4.0
    s.update(False), s.update(False)
    assert s.scale_value == 8.0 and s.history == [(8.0, True), (4.0, False), (4.0, False)]


def _ours_and_fsdp2(steps=3, batch=8, seed=0):
    """Our ZeRO-3, and with its optimizer offloaded to the host, against FSDP2's fully_shard (each block,
    then the root), and with CPUOffloadPolicy: AdamW, the same seed, data and world."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    out = {}
    for offload in (False, True):
        ours = train_zero(ODD, 3, steps=steps, batch_size=batch, seed=seed, offload=offload, capture=True)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
        torch.manual_seed(seed)
        model = GPT(ODD, seed)
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
        grads = {}
        losses = train_torch_peer(model, ODD, steps, batch, seed, grads=grads)
        out[offload] = ours, dict(losses=losses, grads=grads, params=full_params(model))
    return out


@pytest.mark.parametrize("offload", [False, True], ids=["zero3", "zero3+offload"])
def test_our_zero3_matches_fsdp2_fully_shard(fsdp2_runs, offload):
    """The first step's gradients and, after 3 AdamW steps, the losses and parameters. Both sides run the
    same fp32 kernels on the same values in the same order (a gloo sum of two shards, then a division by
    two, which is exact), so they agree to the bit here; 1e-6 leaves room for a backend that sums in
    another order, which AdamW would amplify only for elements at the noise level (none here move)."""
    for ours, theirs in (r[offload] for r in fsdp2_runs):
        assert_grads_match(ours["first_grads"], theirs["grads"], tol=1e-6)
        assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-6)
        for n, p in theirs["params"].items():
            assert (ours["params"][n] - p).abs().max().item() < 1e-6, n


@pytest.fixture(scope="module")
def fsdp2_runs():
    return launch(_ours_and_fsdp2, 2, timeout=120)


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
@given(
    sizes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4),
    n=st.integers(1, 5),
    stage=st.sampled_from([1, 2, 3]),
)
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
    assert torch.equal(flat[: want.numel()], want) and not flat[want.numel() :].any()


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
    want = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ref.parameters()]
    )
    want = comm.all_reduce(want, op="avg")
    u = z.units[0]
    want = torch.cat([want, want.new_zeros(u.padded - u.numel)]).chunk(2)[comm.local_rank()]
    return (z.local_grads()[0] - want).abs().max().item()


@pytest.mark.parametrize("stage", [2, 3])
def test_late_unit_reduces_when_a_rank_has_no_gradient_for_part_of_it(stage):
    """ZeRO-2/3 reduce a unit when its last gradient arrives; a rank whose expert got no tokens never
    gets there. A `late` unit reduces at the end of backward on every rank instead (missing = 0)."""
    assert max(launch(_late_unit, 2, stage, timeout=30)) < 1e-7
