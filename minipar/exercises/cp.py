"""Exercise of notebook 06: the log-sum-exp merge at the heart of ring attention.

`merge(out_a, lse_a, out_b, lse_b) -> (out, lse)`: two partial attention results over disjoint
key sets (out [..., q, d], lse [..., q]) merged into the result over their union
(Milakov & Gimelshein 2018; FlashAttention):
    lse = log(e^lse_a + e^lse_b),   out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b
The checker folds key blocks into the empty result (out 0, lse -inf), with moderate and with
large scores (|S| ~ 1000, where exp(lse) overflows fp32), against attention over all keys.
`cp.merge_attention` is disabled while the student's code runs.
"""

from __future__ import annotations

import torch

from ..cp import attend, merge_attention
from . import Case, Exercise, compare, exercise, student


def _cases(rng):
    fixed = [
        Case("moderate scores, 3 key blocks", (0, 1.0, (2, 7)), expect=1e-5),
        Case("large scores (|S| ~ 1000), 3 key blocks", (1, 300.0, (2, 7)), expect=1e-3),
    ]
    drawn = []
    for _ in range(2):
        cuts = tuple(sorted(rng.sample(range(1, 12), rng.randint(1, 4))))
        scale = rng.choice([1.0, 30.0, 300.0])
        drawn.append(
            Case(
                f"random case: scale {scale:g}, {len(cuts) + 1} key blocks",
                (rng.randint(2, 10_000), scale, cuts),
                random=True,
                expect=1e-5 if scale < 100 else 1e-3,
            )
        )
    return fixed + drawn


def _inputs(seed: int, scale: float, cuts):
    """q, k, v with scores of size ~`scale`, and the keys cut at `cuts` into blocks of unequal size."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 5, 8, generator=g) * scale
    k, v = torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g)
    edges = (0, *cuts, 12)
    return q, [(k[..., a:b, :], v[..., a:b, :]) for a, b in zip(edges, edges[1:])], k, v


def _run(solution, case):
    q, blocks, _, _ = _inputs(*case.args)
    want_out, want_lse = attend(q, blocks[0][0], blocks[0][1])
    out, lse = torch.zeros_like(want_out), torch.full_like(want_lse, float("-inf"))
    for kb, vb in blocks:
        res = student(solution, out, lse, *attend(q, kb, vb))
        if not isinstance(res, (tuple, list)) or len(res) != 2:
            return f"returned {type(res).__name__}, expected a pair (out, lse)"
        out, lse = res
    return out, lse


def _judge(case, outputs):
    got, tol = outputs[0], case.expect
    if isinstance(got, str):
        return (got, "return (out, lse)")
    out, lse = got
    q, _, k, v = _inputs(*case.args)
    want_out, want_lse = attend(q, k, v)
    if not (torch.isfinite(out).all() and torch.isfinite(lse).all()):
        return (
            "the merged result has inf or nan",
            "exp(lse) overflows fp32 beyond ~88: weight each part by exp(lse_part - lse_new) instead, "
            "with lse_new computed by torch.logaddexp (it subtracts the max first)",
        )
    diff = compare(lse, want_lse, "merged lse", atol=tol * max(1.0, want_lse.abs().max().item()))
    if diff:
        return (
            diff,
            "the new lse is log(e^lse_a + e^lse_b), not the max of the two; it must stay exact for the "
            "next merge",
        )
    diff = compare(out, want_out, "merged output", atol=tol)
    if diff:
        return (
            diff,
            "each part's weight is its share of the total softmax mass: exp(lse_a - lse) for out_a and "
            "exp(lse_b - lse) for out_b",
        )
    return None


exercise(
    Exercise(
        name="cp_merge",
        notebook="06_context_parallel",
        function="merge",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(merge_attention,),
        reveals=("merge_attention",),
        deadline=10.0,
        summary="key blocks merge into exact attention over all keys, from the empty result, with moderate and "
        "with large scores",
    )
)
