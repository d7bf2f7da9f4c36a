"""Which layers go on which pipeline stage: a balanced partition of a chain.

A pipeline runs at the pace of its slowest stage: in 1F1B's steady state every
micro-batch waits for it, so the step takes about (m - 1) x max_s T_s + sum_s T_s.
Cutting the chain of layers into p contiguous ranges that minimize max_s T_s is the
inter-operator pass of Alpa (Zheng et al. 2022, Sec. 5) in miniature: one chain, one
cost per layer, no choice of sub-mesh. It is a dynamic program over (stage, first layer):

    best(k, i) = min over j in (i, L-k+1] of max(C(i, j), best(k-1, j))

with C(i, j) the summed cost of layers i..j-1. Many partitions share the optimal
maximum; among them we take the one with the smallest sum of squared stage costs (the
most even), and among those the one whose earliest stages are lightest: the first
stage holds the most micro-batches in flight under 1F1B (p of them), so a layer fewer
there saves the most activation memory. For Llama 3 405B (126 layers on 16 stages,
Dubey et al. 2024, Sec. 3.3.2) this gives 7, 8, ..., 8, 7: the embedding and the
output head balance one layer each on the first and last stage.

**Costs and the embedding/head.** `costs` has one entry per transformer layer, in chain
order. The caller folds the embedding's cost into `costs[0]` and the output head's (and
the loss's) into `costs[-1]`: they are not layers of their own, so the result counts
transformer layers only and every stage gets at least one. `layer_costs` builds such a
list for a GPT-shaped model. Pure Python (no torch): the planner and the training
command share it.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["balance_stages", "layer_costs", "stage_costs"]

_REL = 1e-9  # costs within this relative distance are equal (sums of floats)


def _check(costs, num_stages) -> tuple:
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a whole number >= 1, got {num_stages!r}")
    costs = tuple(float(c) for c in costs)
    if len(costs) < num_stages:
        raise ValueError(
            f"{len(costs)} layers cannot fill {num_stages} stages (each stage needs at least one "
            "layer): use fewer pipeline stages"
        )
    if any(not (c >= 0) or c == float("inf") for c in costs):
        raise ValueError(f"layer costs must be finite and >= 0, got {costs}")
    return costs


def balance_stages(costs: list[float], num_stages: int) -> list[int]:
    """Layers per stage (each >= 1, summing to len(costs)) minimizing the slowest stage's
    summed cost; ties broken by the smallest sum of squares, then lightest first stages."""
    return list(_balance(_check(costs, num_stages), num_stages))


def stage_costs(costs: list[float], stage_layers: list[int]) -> list[float]:
    """Summed cost of each stage of a partition (len(stage_layers) stages)."""
    if sum(stage_layers) != len(costs) or any(n < 1 for n in stage_layers):
        raise ValueError(
            f"stage_layers={list(stage_layers)} must be >= 1 each and sum to {len(costs)} layers"
        )
    out, i = [], 0
    for n in stage_layers:
        out.append(sum(costs[i : i + n]))
        i += n
    return out


@lru_cache(maxsize=1024)
def _balance(costs: tuple, p: int) -> tuple:
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    # pass 1: the optimal maximum. top[k][i] = best max over layers i.. split into k stages. C(i, j)
    # grows with j and top[k-1][j] shrinks with j, so the best j sits where they cross (bisection).
    top = [[inf] * (L + 1) for _ in range(p + 1)]
    top[0][L] = 0.0
    for k in range(1, p + 1):
        prev, row = top[k - 1], top[k]
        for i in range(L - k, -1, -1):
            lo, hi = i + 1, L - k + 1  # j: the first layer of the next stage
            while lo < hi:  # smallest j with C(i, j) >= top[k-1][j]
                mid = (lo + hi) // 2
                if prefix[mid] - prefix[i] >= prev[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            row[i] = min(max(prefix[j] - prefix[i], prev[j]) for j in (lo - 1, lo) if i < j <= L - k + 1)
    limit = top[p][0] * (1 + _REL) + 1e-300

    # pass 2: among partitions with every stage <= limit, the smallest sum of squares
    sq = [[inf] * (L + 1) for _ in range(p + 1)]
    sq[0][L] = 0.0
    for k in range(1, p + 1):
        prev, row = sq[k - 1], sq[k]
        for i in range(L - k, -1, -1):
            best, j = inf, i + 1
            while j <= L - k + 1 and prefix[j] - prefix[i] <= limit:
                c = prefix[j] - prefix[i]
                best = min(best, c * c + prev[j])
                j += 1
            row[i] = best

    # walk from the front: the fewest layers on each stage that keeps both optima
    out, i = [], 0
    for k in range(p, 0, -1):
        for j in range(i + 1, L - k + 2):
            c = prefix[j] - prefix[i]
            if c <= limit and c * c + sq[k - 1][j] <= sq[k][i] * (1 + _REL) + 1e-300:
                out.append(j - i)
                i = j
                break
    return tuple(out)


def layer_costs(
    layers: int,
    hidden: int,
    vocab: int,
    seq: int,
    *,
    ffn_hidden: int | None = None,
    kv_heads: int | None = None,
    heads: int | None = None,
    gated_mlp: bool = False,
    embedding_cost: float = 0.0,
) -> list[float]:
    """Forward FLOPs per token of each transformer layer of a GPT-shaped model, with the
    output head folded into the last layer and `embedding_cost` into the first.

    A layer: 2(h² + 2h·kv·d + h²) for the Q, K, V and output projections (d = h/heads,
    kv = kv_heads; GQA shrinks K and V), 2·h·f·(3 if gated else 2) for the MLP (SwiGLU
    has three matrices), 4·s·h for QKᵀ and softmax·V (Narayanan et al. 2021, Sec. 5.1).
    The head: 2·h·V. The embedding is a lookup (no FLOPs), so its default cost is 0;
    pass its time or memory weight if that is what you balance."""
    for k, x in dict(layers=layers, hidden=hidden, vocab=vocab, seq=seq).items():
        if not isinstance(x, int) or x < 1:
            raise ValueError(f"{k} must be a whole number >= 1, got {x!r}")
    h, f = hidden, ffn_hidden or 4 * hidden
    heads = heads or 1
    kv_dim = h * (kv_heads or heads) // heads
    per = 2 * (2 * h * h + 2 * h * kv_dim) + 2 * h * f * (3 if gated_mlp else 2) + 4 * seq * h
    out = [float(per)] * layers
    out[0] += embedding_cost
    out[-1] += 2.0 * h * vocab
    return out
