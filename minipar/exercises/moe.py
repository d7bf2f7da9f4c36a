"""Exercise of notebook 07: top-k routing with capacity."""
from __future__ import annotations

import torch

from . import Verdict, checker, compare


def topk_route(probs: torch.Tensor, k: int, capacity: int):
    """Reference solution. probs [T, E] (router softmax) -> (index [T, k] best first,
    weights [T, k] (renormalized over the k when k > 1), keep [T, k] bool).

    An expert accepts at most `capacity` choices; first choices of all tokens (in token
    order) are served before any second choice (GShard)."""
    from ..moe import assign_slots
    weights, index = probs.topk(k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return index, weights, assign_slots(index, probs.shape[-1]) < capacity


def _cases():
    gen = torch.Generator().manual_seed(7)
    skewed = torch.randn(10, 4, generator=gen)
    skewed[:, 1] += 2.0                                  # everybody wants expert 1
    return [("T=12, E=4, k=1, capacity=2", torch.randn(12, 4, generator=gen).softmax(-1), 1, 2),
            ("T=12, E=4, k=2, capacity=4", torch.randn(12, 4, generator=gen).softmax(-1), 2, 4),
            ("T=16, E=8, k=2, capacity=16 (nothing drops)", torch.randn(16, 8, generator=gen).softmax(-1), 2, 16),
            ("T=10, E=4, k=1, capacity=3, skewed", skewed.softmax(-1), 1, 3)]


@checker("moe_topk_capacity")
def check_topk_route(solution) -> Verdict:
    """`solution(probs, k, capacity)` must return (index, weights, keep) like `topk_route`."""
    for label, probs, k, C in _cases():
        want_i, want_w, want_keep = topk_route(probs, k, C)
        out = solution(probs.clone(), k, C)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            return Verdict(False, f"{label}: return a tuple (index, weights, keep)")
        index, weights, keep = (torch.as_tensor(t) for t in out)
        if index.shape != want_i.shape or not torch.equal(index.long(), want_i):
            return Verdict(False, f"{label}: expert index differs", "torch.topk(probs, k) gives the k best experts, "
                           "best first; return its indices as [T, k]")
        diff = compare(weights, want_w, f"{label}: weights", atol=1e-6)
        if diff:
            return Verdict(False, diff, "the weights are the chosen probabilities; with k > 1 divide by their sum "
                           "so they add up to 1 (GShard, Mixtral); with k = 1 keep the raw probability")
        keep = keep.bool()
        if keep.shape != want_keep.shape:
            return Verdict(False, f"{label}: keep has shape {tuple(keep.shape)}, expected {tuple(want_keep.shape)}")
        if not torch.equal(keep, want_keep):
            per_expert = torch.bincount(index[keep], minlength=probs.shape[1])
            if keep.all() and not want_keep.all():
                hint = "nothing was dropped: an expert accepts at most `capacity` choices"
            elif (per_expert > C).any():
                hint = f"an expert kept {int(per_expert.max())} choices, more than capacity={C}"
            else:
                hint = ("right number kept, wrong ones: serve every token's first choice (in token order) "
                        "before any second choice, e.g. count positions with a cumsum over the choices "
                        "laid out choice-major")
            return Verdict(False, f"{label}: keep differs in {int((keep != want_keep).sum())} places", hint)
    return Verdict(True, "top-k routing with capacity matches the reference on 4 cases (drops included)")
