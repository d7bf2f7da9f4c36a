"""Memory formulas, each with its source, and the memory of every pipeline stage of a layout.

`stage_memory` sums, per pipeline rank, the parameters of its stages' layers (experts split e ways),
the embedding on the first stage and the head on the last, their model states by ZeRO stage, and
the activations of the micro-batches the rank holds in flight; the busiest rank is what must fit.
"""

from __future__ import annotations

from functools import lru_cache

from ..pp.partition import balance_stages

__all__ = ["model_state_bytes", "stage_params", "partition", "in_flight", "stage_memory"]


def model_state_bytes(
    num_params: float, dp: int, zero_stage: int, k: float = 12, param_bytes: float = 2, grad_bytes: float = 2
) -> float:
    """Per-device bytes of parameters, gradients and optimizer state (ZeRO, Rajbhandari et al. 2020, Sec. 5 / Fig. 1).

    With Ψ parameters, N data-parallel ranks and K bytes of optimizer state per parameter
    (K = 12 for mixed-precision Adam: fp32 master weights, momentum and variance):
        stage 0 (DDP):  (2 + 2 + K) Ψ
        stage 1 (P_os): 2Ψ + 2Ψ + KΨ/N
        stage 2 (P_os+g): 2Ψ + (2 + K)Ψ/N
        stage 3 (P_os+g+p): (2 + 2 + K)Ψ/N
    `param_bytes`/`grad_bytes` generalize the 2s for other dtypes (4 for fp32).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    P, G, K = param_bytes * num_params, grad_bytes * num_params, k * num_params
    return {0: P + G + K, 1: P + G + K / dp, 2: P + (G + K) / dp, 3: (P + G + K) / dp}[zero_stage]


def stage_params(layers: int, hidden: int, vocab: int, seq: int, tp: int, pp: int) -> float:
    """Parameters on the first pipeline stage's GPU of a GPT: its l/p layers plus the word and
    position embeddings, all split t ways (Megatron's vocab-parallel embedding)."""
    per_layer = 12 * hidden**2 * (1 + 13 / (12 * hidden))
    return (layers / pp * per_layer + (vocab + seq) * hidden) / tp


def partition(M, S: int, stage_layers) -> list:
    """`stage_layers`, else equal stages, else the balanced partition (`pp.balance_stages`) of the
    layers' forward FLOPs with the head's folded into the last layer."""
    if stage_layers is not None:
        return list(stage_layers)
    if M.layers % S == 0:
        return [M.layers // S] * S
    return list(_balanced(M, S))


@lru_cache(maxsize=1024)
def _balanced(M, S: int) -> tuple:
    costs = [M.layer_matmul_flops(k) + M.attention_core_flops() for k in M.layer_kinds()]
    costs[-1] += M.head_flops
    return tuple(balance_stages(costs, S))


def in_flight(schedule: str, p: int, m: int, v: int, rank: int) -> float:
    """Micro-batches (through one rank's whole share of layers) rank `rank` holds at its peak."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved_1f1b":  # Korthikanti 2022 Sec. 4.2.3 for rank 0
        return min(m, p - rank + (p - 1) / v)
    if schedule == "dualpipe":  # DeepSeek-V3 Table 2: PP + 1 stages' activations
        return (p + 1) / 2
    if schedule == "dualpipev":
        return (2 * p + 1) / 2
    return float(min(m, p - rank))


@lru_cache(maxsize=65536)
def _layer_memory(M, b, moe, tp, sp, recompute, flash, cp, ep) -> tuple:
    """(dense params, expert params, activation bytes) of one layer on one GPU."""
    expert = M.experts * M.mlp_params(M.expert_ffn_hidden or M.ffn) if moe else 0
    return (
        (M.layer_params(moe) - expert) / tp,
        expert / (tp * ep),
        M.layer_activation_bytes(M.seq, b, moe, tp, sp, recompute, flash, cp),
    )


def stage_memory(M, b, m, tp, pp, dp, cp, v, zero, recompute, sp, schedule, ep, stage_layers, flash):
    """(breakdown of the busiest rank, layers per stage, per-rank sums) of memory."""
    S = pp * v if schedule == "interleaved_1f1b" else 2 * pp if schedule == "dualpipev" else pp
    counts = partition(M, S, stage_layers)
    kinds, i = M.layer_kinds(), 0
    rank_of = (lambda s: s % pp) if schedule != "dualpipev" else (lambda s: s if s < pp else 2 * pp - 1 - s)
    per_rank = {r: dict(dense=0.0, expert=0.0, acts=0.0, layers=0) for r in range(pp)}
    for s, n in enumerate(counts):
        r = rank_of(s)
        n_moe = sum(kinds[i : i + n])
        for moe, k in ((False, n - n_moe), (True, n_moe)):
            if not k:
                continue
            d, e, a = _layer_memory(M, b, moe, tp, sp, recompute, flash, cp, ep)
            for rr in {r, pp - 1 - r} if schedule == "dualpipe" else {r}:  # DualPipe keeps 2 copies
                per_rank[rr]["dense"] += k * d
                per_rank[rr]["expert"] += k * e
            per_rank[r]["acts"] += k * a
        per_rank[r]["layers"] += n
        i += n
    sbh = M.seq / cp * b * M.hidden
    per_rank[0]["dense"] += M.embedding_params / tp
    per_rank[rank_of(S - 1)]["dense"] += (M.head_params or (M.vocab * M.hidden if pp > 1 else 0)) / tp
    best = None
    for r, x in per_rank.items():
        k_dense, k_exp = dp * cp, max(1, dp * cp // ep)
        states_d, states_e = (
            model_state_bytes(x["dense"], k_dense, zero),
            model_state_bytes(x["expert"], k_exp, zero),
        )
        params = 2 * (x["dense"] / (k_dense if zero == 3 else 1) + x["expert"] / (k_exp if zero == 3 else 1))
        grads = 2 * (x["dense"] / (k_dense if zero >= 2 else 1) + x["expert"] / (k_exp if zero >= 2 else 1))
        acts = x["acts"] * in_flight(schedule, pp, m, v, r)
        if recompute == "full":  # one layer's full activations are live while it is recomputed
            acts += _layer_memory(M, b, bool(M.experts), tp, sp, None, flash, cp, ep)[2]
        if r == 0 and M.dropout:  # the embedding's dropout mask
            acts += sbh * min(pp, m) / 2 / (tp if sp else 1)
        if r == rank_of(S - 1):  # fp32 logits and the final norm's input (Korthikanti Sec. 4.3)
            acts += 4 * sbh * (1 + M.vocab / M.hidden) / tp
        row = {
            "params": params,
            "grads": grads,
            "optimizer": states_d + states_e - params - grads,
            "activations": acts,
        }
        x.update(total=sum(row.values()), row=row, psi=x["dense"] + x["expert"])
        if best is None or x["total"] > best["total"]:
            best = x
    return best["row"], counts, per_rank
