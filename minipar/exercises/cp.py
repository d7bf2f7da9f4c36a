"""Exercise of notebook 06: the log-sum-exp merge at the heart of ring attention."""
from __future__ import annotations

import torch

from . import Verdict, checker, compare


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Reference solution: the softmax result over keys A ∪ B from the results over A and over B."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse).unsqueeze(-1) * out_a + torch.exp(lse_b - lse).unsqueeze(-1) * out_b, lse


def _case(seed: int, scale: float):
    """q, k, v with scores of size ~`scale`, and the keys cut into three blocks of unequal size."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 5, 8, generator=g) * scale
    k, v = torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g)
    return q, [(k[..., a:b, :], v[..., a:b, :]) for a, b in ((0, 2), (2, 7), (7, 12))], k, v


@checker("cp_merge")
def check_merge(solution) -> Verdict:
    """`solution(out_a, lse_a, out_b, lse_b) -> (out, lse)` must fold three key blocks, starting from
    the empty result (out 0, lse -inf), into exactly the attention over all keys, even for large scores."""
    from ..cp import attend
    for what, seed, scale, tol in (("moderate scores", 0, 1.0, 1e-5), ("large scores (|S| ~ 1000)", 1, 300.0, 1e-3)):
        q, blocks, k, v = _case(seed, scale)
        want_out, want_lse = attend(q, k, v)
        out, lse = torch.zeros_like(want_out), torch.full_like(want_lse, float("-inf"))
        for kb, vb in blocks:
            out, lse = solution(out, lse, *attend(q, kb, vb))
        if not (torch.isfinite(out).all() and torch.isfinite(lse).all()):
            return Verdict(False, f"{what}: the merged result has inf or nan",
                           "exp(lse) overflows fp32 beyond ~88: weight each part by exp(lse_part - lse_new) instead, "
                           "with lse_new computed by torch.logaddexp (it subtracts the max first)")
        diff = compare(lse, want_lse, f"{what}: merged lse", atol=tol * max(1.0, want_lse.abs().max().item()))
        if diff:
            return Verdict(False, diff, "the new lse is log(e^lse_a + e^lse_b), not the max of the two; "
                           "it must stay exact for the next merge")
        diff = compare(out, want_out, f"{what}: merged output", atol=tol)
        if diff:
            return Verdict(False, diff, "each part's weight is its share of the total softmax mass: "
                           "exp(lse_a - lse) for out_a and exp(lse_b - lse) for out_b")
    return Verdict(True, "three blocks merge into exact attention over all keys, from the empty result, "
                   "with moderate and with large scores")
