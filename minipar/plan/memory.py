"""Memory formulas, each with its source."""
from __future__ import annotations


def model_state_bytes(num_params: float, dp: int, zero_stage: int, k: float = 12,
                      param_bytes: float = 2, grad_bytes: float = 2) -> float:
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
