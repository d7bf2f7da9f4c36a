# TEMP until minipar.collectives.alpha_beta lands
"""A stand-in for `minipar.collectives.alpha_beta`, with the same signature and formulas.

Imported from exactly one place (`topology.py`); swap that import at merge.

The α-β costs of Thakur, Rabenseifner & Gropp 2005 ("Optimization of collective
communication operations in MPICH"), per rank, for a message of S bytes over n ranks:

| algorithm | op | steps (α count) | bytes sent per rank (β count) |
|---|---|---|---|
| ring | all_reduce | 2(n-1) | 2(n-1)/n · S |
| ring | all_gather, reduce_scatter | n-1 | (n-1)/n · S |
| tree | all_reduce | 2·ceil(log2 n) | S per step, 2·ceil(log2 n) · S |
| halving_doubling | all_reduce | 2·log2 n | 2(n-1)/n · S  (n a power of two) |
| halving_doubling | all_gather, reduce_scatter | log2 n | (n-1)/n · S |
| pairwise | all_to_all | n-1 | (n-1)/n · S |

A non-power-of-two n for halving-doubling folds the r = n - 2^⌊log2 n⌋ extra ranks into
their partners first and unfolds at the end (Rabenseifner's variant): 2 more steps and
S more bytes on the critical path.
"""
from __future__ import annotations

import math

ALGORITHMS = ("ring", "tree", "halving_doubling", "pairwise")
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def alpha_beta(algorithm: str, op: str, n: int, nbytes: float) -> tuple[int, float]:
    """(sequential message steps on the critical path, bytes each rank sends on it)."""
    if algorithm not in ALGORITHMS or op not in OPS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS} and op one of {OPS}, got {algorithm!r}, {op!r}")
    if not isinstance(n, int) or n < 1 or nbytes < 0:
        raise ValueError(f"n must be a whole number >= 1 and nbytes >= 0, got n={n!r}, nbytes={nbytes!r}")
    if n == 1:
        return 0, 0.0
    S = float(nbytes)
    if algorithm == "ring":
        if op == "all_reduce":
            return 2 * (n - 1), 2 * (n - 1) / n * S
        if op in ("all_gather", "reduce_scatter"):
            return n - 1, (n - 1) / n * S
    if algorithm == "tree" and op == "all_reduce":
        steps = 2 * math.ceil(math.log2(n))
        return steps, steps * S
    if algorithm == "halving_doubling" and op != "all_to_all":
        k = int(math.floor(math.log2(n)))
        extra = 2 if 2 ** k != n else 0
        m = 2 ** k
        if op == "all_reduce":
            return 2 * k + extra, 2 * (m - 1) / m * S + (S if extra else 0.0)
        return k + extra // 2, (m - 1) / m * S + (S / 2 if extra else 0.0)
    if algorithm == "pairwise" and op == "all_to_all":
        return n - 1, (n - 1) / n * S
    raise ValueError(f"{algorithm} does not implement {op}")
