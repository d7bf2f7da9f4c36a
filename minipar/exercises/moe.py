"""Exercise of notebook 07: top-k routing with capacity.

`my_topk_route(probs, k, capacity)`: probs [T, E] (router softmax) -> (index [T, k] best first,
weights [T, k] (renormalized over the k when k > 1), keep [T, k] bool). An expert accepts at
most `capacity` choices; every token's first choice, in token order, is served before any
second choice (GShard, Lepikhin et al. 2020, Alg. 1). `moe.route` and `moe.assign_slots` are
disabled while the student's code runs.
"""

from __future__ import annotations

import torch

from ..moe import assign_slots, route
from . import Case, Exercise, compare, exercise, student


def _expected(probs: torch.Tensor, k: int, capacity: int):
    """What the checker compares with: the k most probable experts, their renormalized
    probabilities, and the package's slot assignment."""
    index = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen = probs.gather(-1, index)
    return (
        index,
        chosen / chosen.sum(-1, keepdim=True) if k > 1 else chosen,
        assign_slots(index, probs.shape[-1]) < capacity,
    )


def _cases(rng):
    fixed = [
        ("T=12, E=4, k=1, capacity=2", (12, 4, 1, 2, 0.0, 1)),
        ("T=12, E=4, k=2, capacity=4", (12, 4, 2, 4, 0.0, 2)),
        ("T=16, E=8, k=2, capacity=16 (nothing drops)", (16, 8, 2, 16, 0.0, 3)),
        ("T=10, E=4, k=1, capacity=3, skewed", (10, 4, 1, 3, 2.0, 4)),
    ]
    cases = [Case(name, args) for name, args in fixed]
    for _ in range(2):
        T, E = rng.randint(4, 40), rng.randint(2, 8)
        k = rng.randint(1, min(3, E))
        C, skew, seed = rng.randint(1, T), rng.choice([0.0, 1.5]), rng.randint(5, 10_000)
        cases.append(
            Case(
                f"random case T={T}, E={E}, k={k}, capacity={C}{', skewed' if skew else ''}",
                (T, E, k, C, skew, seed),
                random=True,
            )
        )
    return cases


def _probs(T, E, k, C, skew, seed):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    logits[:, 1] += skew  # everybody wants expert 1
    return logits.softmax(-1)


def _run(solution, case):
    T, E, k, C, _, _ = case.args
    out = student(solution, _probs(*case.args), k, C)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        return f"returned {type(out).__name__}, expected a tuple (index, weights, keep)"
    return tuple(torch.as_tensor(t) for t in out)


def _judge(case, outputs):
    T, E, k, C, _, _ = case.args
    out = outputs[0]
    if isinstance(out, str):
        return (out, "return (index, weights, keep)")
    index, weights, keep = out
    want_i, want_w, want_keep = _expected(_probs(*case.args), k, C)
    if index.shape != want_i.shape or not torch.equal(index.long(), want_i):
        return (
            "expert index differs",
            "torch.topk(probs, k) gives the k best experts, best first; return its indices as [T, k]",
        )
    diff = compare(weights, want_w, "weights", atol=1e-6)
    if diff:
        return (
            diff,
            "the weights are the chosen probabilities; with k > 1 divide by their sum so they add up to "
            "1 (GShard, Mixtral); with k = 1 keep the raw probability",
        )
    keep = keep.bool()
    if keep.shape != want_keep.shape:
        return (
            f"keep has shape {tuple(keep.shape)}, expected {tuple(want_keep.shape)}",
            "one flag per (token, choice)",
        )
    if not torch.equal(keep, want_keep):
        per_expert = torch.bincount(index[keep].long(), minlength=E)
        if keep.all() and not want_keep.all():
            hint = "nothing was dropped: an expert accepts at most `capacity` choices"
        elif (per_expert > C).any():
            hint = f"an expert kept {int(per_expert.max())} choices, more than capacity={C}"
        else:
            hint = (
                "right number kept, wrong ones: serve every token's first choice (in token order) before any "
                "second choice, e.g. count positions with a cumsum over the choices laid out choice-major"
            )
        return (f"keep differs in {int((keep != want_keep).sum())} places", hint)
    return None


exercise(
    Exercise(
        name="moe_topk_capacity",
        notebook="07_moe_expert_parallel",
        function="my_topk_route",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(assign_slots, route, _expected),
        reveals=("assign_slots", "topk_route", "inspect.getsource(route)"),
        deadline=10.0,
        summary="top-k routing with capacity matches, drops included",
    )
)
