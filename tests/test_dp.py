"""DDP from scratch: buckets, overlap, no_sync, reduce dtype; torch's DDP; recompute.
(Parity of DDP with the single-device loop over the whole grid is in test_zero.py.)"""

import pytest
import torch
from _parity import assert_grads_match, assert_params_match, grad_errors
from _peers import full_params, train_torch_peer
from _wire import handed_to_backend, total

from minipar import launch, trace
from minipar.activations import SavedActivations
from minipar.dp import DDP, check_batch, local_batch, train_ddp, train_steps
from minipar.model import GPT, GPTConfig, SyntheticData, make_optimizer, train_reference
from minipar.recompute import apply_recompute

CFG = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)
SMALL_BUCKET = 0.01  # MiB: about 10k bytes, several buckets for this model


def _buckets_and_overlap():
    torch.manual_seed(0)
    model = GPT(CFG, 0)
    ddp = DDP(model, bucket_mb=SMALL_BUCKET)
    opt = make_optimizer(model.parameters(), kind="sgd")
    grads = {}

    def step():
        if not grads:  # the first step's gradients, as all-reduced into the buckets
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()

    trace.reset()
    with handed_to_backend() as log:
        losses = train_steps(ddp, step, CFG, steps=3, batch_size=8, grad_accum=2)
    order = [[n for n, p in model.named_parameters() if any(p is q for q in b.params)] for b in ddp.buckets]
    return dict(
        evs=trace.events(),
        order=order,
        n_buckets=len(ddp.buckets),
        losses=losses,
        grads=grads,
        sizes=[b.buffer.numel() * 4 for b in ddp.buckets],
        backend=[c.nbytes for c in log if c.op == "all_reduce"],
        params={n: p.detach().clone() for n, p in model.named_parameters()},
    )


def test_buckets_overlap_backward_and_no_sync_communicates_only_the_last_micro_batch():
    res = launch(_buckets_and_overlap, 2)
    r0 = res[0]
    # buckets: reverse registration order (the head's gradients come first), each under the cap
    assert r0["n_buckets"] >= 3 and r0["order"][0][-1] == "head.weight" and r0["order"][-1][0] == "wte.weight"
    # a bucket stays under the cap unless one parameter alone exceeds it
    assert all(s <= SMALL_BUCKET * 2**20 or len(names) == 1 for s, names in zip(r0["sizes"], r0["order"]))
    evs = r0["evs"]
    reduces = [e for e in evs if e.name == "all_reduce"]
    # no_sync: 3 steps x 2 micro-batches, but one all-reduce per bucket per step (measured at the backend:
    # the buckets in launch order, then the logged loss's one float)
    assert len(reduces) == 3 * r0["n_buckets"]
    assert r0["backend"] == (r0["sizes"] + [4]) * 3
    # overlap: in every step some bucket's all-reduce starts before the last backward ends
    backward = [e for e in evs if e.name == "B"][1::2]  # the second (synchronizing) micro-batch
    for b in backward:
        inside = [e for e in reduces if b.start < e.start < b.end]
        assert len(inside) >= r0["n_buckets"] - 1
    # the first backward's gradients (averaged over the ranks and the micro-batches), then 3 SGD steps
    assert_grads_match(r0["grads"], train_reference(CFG, 1, 8, 0, grad_accum=2).grads)
    ref = train_reference(CFG, 3, 8, 0, grad_accum=2, kind="sgd")
    assert r0["losses"] == pytest.approx(ref.losses, abs=1e-5)
    for r in res:
        assert_params_match(r["params"], dict(ref.model.named_parameters()))


def _ours_and_torch_ddp(steps=3, batch=8):
    from torch.nn.parallel import DistributedDataParallel

    ours = train_ddp(CFG, steps=steps, batch_size=batch, bucket_mb=SMALL_BUCKET)
    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(CFG, 0), bucket_cap_mb=SMALL_BUCKET)
    grads = {}
    losses = train_torch_peer(model, CFG, steps, batch, grads=grads)
    return ours, dict(losses=losses, grads=grads, params=full_params(model))


def test_our_ddp_matches_torch_ddp():
    """The first step's gradients, then after 3 AdamW steps the losses and parameters. Both average two
    replicas' fp32 sums (exact division by 2), so they agree to the bit here; 1e-6 leaves room for a backend
    that sums in another order."""
    for ours, theirs in launch(_ours_and_torch_ddp, 2):
        assert_grads_match(ours["first_grads"], theirs["grads"], tol=1e-6)
        assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-6)
        for n, p in theirs["params"].items():
            assert (ours["params"][n] - p).abs().max().item() < 1e-6, n


def _reduce_in_bf16():
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        with handed_to_backend() as log:
            out[name] = train_ddp(CFG, steps=3, reduce_dtype=dtype)
        out[name]["bytes"] = total(log, "all_reduce")
    return out


def test_reducing_gradients_in_bf16_halves_the_traffic_and_stays_close():
    """Bytes handed to the backend: the gradient buckets in 2 bytes instead of 4, and the logged loss
    (one fp32 per step) in both. Each rank's gradient element is rounded to bf16 (u = 2^-8) before the sum
    and the sum once more: to first order u(|a| + |b|)/2 + u|a + b|/2 for ranks' gradients a, b, which can
    exceed their mean. Measured 1.36 u of each tensor's scale (under either kernel set); bound 4 u."""
    res = launch(_reduce_in_bf16, 2)[0]
    lo, hi, loss = res["bf16"], res["fp32"], 3 * 4
    assert (lo["bytes"] - loss) * 2 == hi["bytes"] - loss == 3 * 4 * lo["num_params"]
    assert_grads_match(lo["first_grads"], hi["first_grads"], tol=4 * 2.0**-8)
    assert (
        max(grad_errors(lo["first_grads"], hi["first_grads"]).values()) > 0
    )  # bf16 rounding is visible: the switch did something
    assert lo["losses"] == pytest.approx(hi["losses"], abs=1e-2)


def _zero_grad_misuse():
    model = GPT(CFG, 0)
    ddp = DDP(model)
    opt = make_optimizer(model.parameters())
    opt.zero_grad(set_to_none=True)
    x, y = local_batch(SyntheticData(CFG.vocab, CFG.seq), 0, 4)
    ddp(x, y)[1].backward()


def test_dropping_the_bucket_views_is_caught():
    with pytest.raises(Exception, match="ddp.zero_grad"):
        launch(_zero_grad_misuse, 2)


def test_recompute_keeps_gradients_and_saves_activation_memory():
    x, y = SyntheticData(CFG.vocab, CFG.seq).batch(0, 4)
    grads, saved = {}, {}
    for mode in (None, "selective", "full"):
        model = GPT(CFG, 0)
        if mode:
            apply_recompute(model, mode)
        with SavedActivations(model) as meter:
            _, loss = model(x, y)
        saved[mode] = meter.bytes
        loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("selective", "full"):
        for n, g in grads[None].items():
            assert torch.equal(grads[mode][n], g), (mode, n)  # recompute is exact
    assert saved["full"] < saved["selective"] < saved[None]
    with pytest.raises(ValueError, match="full"):
        apply_recompute(GPT(CFG), "partial")
    with pytest.raises(ValueError, match="out of range"):
        apply_recompute(GPT(CFG), "full", layers=[5])


def test_bad_batch_and_bucket_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        check_batch(12, dp=4, grad_accum=2)
    with pytest.raises(ValueError, match="bucket_mb"):
        DDP(GPT(CFG), bucket_mb=0)
