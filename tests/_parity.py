"""How the parity tests compare a strategy with the single-device reference (DEVELOPING.md, "Parity").

Gradients after the first backward, gathered to full shape, relative to each tensor's largest
entry: a scale bug (a sum that should be a mean, a replica counted twice) moves every entry of
some tensor by a fixed factor and fails here, where AdamW would hide it from the loss curve.
Then the parameters after a few SGD steps, whose error is lr x steps x the gradients' (no √v
to amplify rounding noise; see `model.make_optimizer`).

Why 1e-5 holds on any CPU: fp32 has u = 2^-24 ≈ 6e-8, and these gradients are sums of at most a
few thousand products, computed in another order by the parallel layout (and by another
kernel set under ATEN_CPU_CAPABILITY): measured differences are below 1e-6 of each tensor's
scale under `default` and `avx2` alike; 1e-5 leaves a factor of 10.
"""

import os

GRAD_TOL = 1e-5
# A tensor whose exact gradient is 0 holds fp32 rounding noise (attn.k.bias: softmax is blind to a
# constant added to every key; ~1e-11 here): it is compared relative to FLOOR x the model's
# largest gradient (~0.2) instead of its own noise.
FLOOR = 1e-4


def grad_scales(want: dict) -> dict:
    """{name: the scale a gradient is compared at}: its largest entry, at least FLOOR x the model's."""
    top = max(w.abs().max().item() for w in want.values())
    return {n: max(w.abs().max().item(), FLOOR * top) for n, w in want.items()}


def grad_errors(got: dict, want: dict) -> dict:
    """{name: max |got - want| / its scale (`grad_scales`)}, in float64."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    out = {}
    for n, scale in grad_scales(want).items():
        g, w = got[n], want[n]
        assert g.shape == w.shape, (n, tuple(g.shape), tuple(w.shape))
        out[n] = (g.detach().cpu().double() - w.detach().cpu().double()).abs().max().item() / scale
    return out


def assert_grads_match(got: dict, want: dict, tol: float = GRAD_TOL, what: str = "") -> None:
    """Every gradient within `tol` of the reference's, relative to its tensor's scale. With
    MINIPAR_PARITY_LOG=FILE set, each comparison's largest error is appended to FILE (to see the margins)."""
    errs = grad_errors(got, want)
    if os.environ.get("MINIPAR_PARITY_LOG"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ["MINIPAR_PARITY_LOG"], "a") as f:
            f.write(f"{test}\t{what}\t{tol:g}\t{max(errs.values()):.3g}\n")
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: gradients off (relative error > {tol}): {bad}"


def assert_params_match(got: dict, want: dict, rel: float = 1e-6, abs_: float = 1e-8, what: str = "") -> None:
    """Parameters after SGD steps: |Δ| <= rel x max |p| + abs_ per tensor. SGD moves a parameter by
    lr x (g + wd·p) per step, so after N steps the error is N·lr·(the gradients' error): 3 steps x
    3e-3 x 1e-6 of a gradient scale of ~0.2 is ~2e-9, far below both terms; a gradient off by a
    constant factor moves a parameter by ~lr·|g| ~ 1e-4, far above them."""
    assert set(got) >= set(want), sorted(set(want) - set(got))
    for n, w in want.items():
        w = w.detach().cpu().double()
        diff = (got[n].detach().cpu().double() - w).abs().max().item()
        assert diff <= rel * w.abs().max().item() + abs_, f"{what}: parameter {n} off by {diff:.3g}"


def assert_moved(after: dict, before, at_least: float = 1e-4) -> None:
    """The steps moved some parameter by more than `at_least` (100x the parameter bounds above), so a
    comparison of parameters after them means something. `before`: the model at initialization."""
    moved = max(
        (after[n].detach().cpu() - p.detach().cpu()).abs().max().item() for n, p in before.named_parameters()
    )
    assert moved > at_least, f"the steps moved no parameter by more than {moved:.2g}"
