"""Published numbers the planner is checked against, and the comparisons.

Each table is what the paper printed; each function returns rows of
(configuration, predicted, published, relative error). The planner's constants
(`ASSUMPTIONS`) are one set for all of them: nothing here is tuned per row.
"""
from __future__ import annotations

import math

from .estimate import ASSUMPTIONS, estimate
from .formulas import activation_bytes_per_layer, num_params
from .memory import model_state_bytes

__all__ = ["ZERO_TABLE1", "MEGATRON_2021_TABLE1", "KORTHIKANTI_2022_MFU", "zero_table", "megatron_table",
           "korthikanti_mfu_table", "selective_recompute_savings", "paper_rounding_matches"]

# Rajbhandari et al. 2020 (ZeRO), Table 1: per-device model-state memory (GB, 1e9 bytes) of
# mixed-precision Adam (K = 12) by DP degree, for Ψ = 7.5B, 128B, 1T; columns P_os, P_os+g, P_os+g+p.
# DP = 1 is the baseline (2 + 2 + K)Ψ.
ZERO_TABLE1 = {
    7.5e9: {1: (120, 120, 120), 4: (52.5, 41.3, 30), 16: (35.6, 21.6, 7.5), 64: (31.4, 16.6, 1.88),
            256: (30.4, 15.4, 0.47), 1024: (30.1, 15.1, 0.12)},
    128e9: {1: (2048, 2048, 2048), 4: (896, 704, 512), 16: (608, 368, 128), 64: (536, 284, 32),
            256: (518, 263, 8), 1024: (513, 257, 2)},
    1e12: {1: (16000, 16000, 16000), 4: (7000, 5500, 4000), 16: (4750, 2875, 1000), 64: (4187, 2218, 250),
           256: (4046, 2054, 62.5), 1024: (4011, 2013, 15.6)},
}

# Narayanan et al. 2021 (Megatron-LM on GPU clusters), Table 1: GPT, V = 51,200, s = 2048,
# A100 80GB on Selene (8 GPUs + 8 HDR NICs per node), full recompute, interleaved schedule.
# (params B, heads, hidden, layers, tp, pp, gpus, global batch, achieved TFLOP/s per GPU)
MEGATRON_2021_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]

# Korthikanti et al. 2022, Table 3 configurations (micro-batch 1, s = 2048, dp = 1) and the
# model FLOPs utilization published with them (Megatron-LM README): TP + SP + selective recompute.
# (name, heads, hidden, layers, tp, pp, gpus, global batch, MFU)
KORTHIKANTI_2022_MFU = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 0.415), ("175B", 96, 12288, 96, 8, 8, 64, 64, 0.514),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 0.560), ("1T", 160, 25600, 128, 8, 64, 512, 512, 0.563),
]


def paper_rounding_matches(value: float, printed: float) -> bool:
    """True if `value` prints as `printed` at the paper's precision: rounded (41.25 → 41.3)
    or truncated (4187.5 → 4187), the two conventions ZeRO's Table 1 mixes."""
    s = repr(float(printed))
    d = 0 if float(printed).is_integer() else len(s.split(".")[1])
    scale = 10 ** d
    half_up = math.floor(value * scale + 0.5) / scale
    truncated = math.floor(value * scale + 1e-9) / scale
    return math.isclose(half_up, printed) or math.isclose(truncated, printed)


def zero_table() -> list[dict]:
    """ZeRO Table 1 recomputed with `model_state_bytes`, beside the printed numbers."""
    rows = []
    for psi, by_dp in ZERO_TABLE1.items():
        for dp, printed in by_dp.items():
            for stage, pub in zip((1, 2, 3), printed):
                got = model_state_bytes(psi, dp, stage) / 1e9
                rows.append(dict(params=psi, dp=dp, stage=stage, predicted=got, published=pub,
                                 error=got / pub - 1, match=paper_rounding_matches(got, pub)))
    return rows


def megatron_table(assumptions=None) -> list[dict]:
    """Megatron 2021 Table 1: parameter counts and TFLOP/s per GPU, predicted vs published.

    Configuration the paper states: full recompute, no sequence parallelism (it came in
    2022), no distributed optimizer (ZeRO-0), interleaved schedule. It does not state the
    micro-batch size or v: we use b = 1 and the smallest v > 1 that divides the layers per
    stage (2, or 3 when l/p is odd), the same rule on every row."""
    rows = []
    for P, a, h, l, t, p, n, B, pub in MEGATRON_2021_TABLE1:
        per_stage = l // p
        v = 1 if p == 1 else next(x for x in (2, 3, 5, 7) if per_stage % x == 0)
        e = estimate(l, h, a, 51200, 2048, B, 1, n, "a100", tp=t, pp=p, v=v, zero_stage=0, recompute="full",
                     sequence_parallel=False, assumptions=assumptions or ASSUMPTIONS)
        rows.append(dict(params_published=P, params=num_params(l, h, 51200, 2048) / 1e9, tp=t, pp=p, v=v, gpus=n,
                         batch=B, predicted=e.tflops_per_gpu, published=pub, error=e.tflops_per_gpu / pub - 1,
                         bubble=e.bubble_fraction, estimate=e))
    return rows


def korthikanti_mfu_table(assumptions=None) -> list[dict]:
    """Korthikanti 2022's MFU (TP + SP + selective recompute, dp = 1) predicted vs published,
    with the same v rule as `megatron_table`."""
    rows = []
    for name, a, h, l, t, p, n, B, pub in KORTHIKANTI_2022_MFU:
        v = 1 if p == 1 else next(x for x in (2, 3, 5, 7) if (l // p) % x == 0)
        e = estimate(l, h, a, 51200, 2048, B, 1, n, "a100", tp=t, pp=p, v=v, zero_stage=1, recompute="selective",
                     sequence_parallel=True, assumptions=assumptions or ASSUMPTIONS)
        rows.append(dict(model=name, tp=t, pp=p, v=v, gpus=n, predicted=e.mfu, published=pub,
                         error=e.mfu / pub - 1, estimate=e))
    return rows


def selective_recompute_savings(seq: int, hidden: int, heads: int, tp: int = 8) -> float:
    """Fraction of activation memory selective recompute removes under TP + SP:
    (5as/h) / (34 + 5as/h). Korthikanti 2022 Sec. 4.3: 70% for GPT-3, 65% for MT-NLG."""
    full = activation_bytes_per_layer(seq, 1, hidden, heads, tp, True, None)
    sel = activation_bytes_per_layer(seq, 1, hidden, heads, tp, True, "selective")
    return 1 - sel / full
