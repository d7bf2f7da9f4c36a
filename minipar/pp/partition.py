"""Balanced pipeline stages: cut a chain of layers into contiguous stages whose slowest is fastest.

A dynamic program over contiguous ranges (Alpa's inter-operator pass, for one chain):

    best[k][j] = min over i < j of  max(best[k-1][i], cost(i..j))

the lowest possible "slowest stage" when the first j layers form k stages. The embedding's
cost is folded into the first layer's and the output head's into the last layer's, which is
why Llama 3 puts one block fewer on its first and last stages.
"""
from __future__ import annotations

__all__ = ["balance_stages", "layer_costs"]


def layer_costs(layers: int, hidden: int, seq: int, vocab: int) -> list[float]:
    """Forward FLOPs per token of each block of a GPT, with the head's folded into the last:
    a block costs 24h² + 4sh (its matmuls and attention scores), the head 2hV."""
    block = 24 * hidden * hidden + 4 * seq * hidden
    costs = [float(block)] * layers
    costs[-1] += 2 * hidden * vocab
    return costs


def balance_stages(costs: list[float], num_stages: int) -> list[int]:
    """Layers per stage (each >= 1, in chain order) minimizing the slowest stage's total cost.
    Among equally slow splits, the earliest stages take the most layers (ties are broken the
    same way every time, so every rank computes the same split)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"{n} layers cannot fill {num_stages} stages: every stage needs at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j] - 1e-12 * abs(v):
                    best[k][j], cut[k][j] = v, i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]
