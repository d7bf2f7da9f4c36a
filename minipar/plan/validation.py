"""Published numbers the planner is checked against, and the comparisons.

Each table is what the paper printed; each function returns rows of
(configuration, predicted, published, relative error). The planner's constants
(`ASSUMPTIONS`) are one set for all of them: nothing here is tuned per row.
"""

from __future__ import annotations

import math

from .arch import ARCH_FIELDS, MODELS, ModelShape
from .estimate import estimate as _estimate
from .formulas import activation_bytes_per_layer, num_params
from .memory import model_state_bytes

__all__ = [
    "NEMOTRON4_TABLE2",
    "NEMOTRON4",
    "nemotron4_table2",
    "MEGATRON_BRIDGE_MOE",
    "MOE_MODELS",
    "megatron_bridge_moe",
    "MEGATRON_2021_TABLE2",
    "KORTHIKANTI_2022_TABLE5",
    "BLOOM",
    "LLAMA3_TABLE4",
    "megatron_table2",
    "korthikanti_table5",
    "bloom_row",
    "llama3_table4",
    "public_tables",
    "summary",
    "ZERO_TABLE1",
    "MEGATRON_2021_TABLE1",
    "KORTHIKANTI_2022_MFU",
    "zero_table",
    "megatron_table",
    "korthikanti_mfu_table",
    "selective_recompute_savings",
    "paper_rounding_matches",
]

# Rajbhandari et al. 2020 (ZeRO), Table 1: per-device model-state memory (GB, 1e9 bytes) of
# mixed-precision Adam (K = 12) by DP degree, for Ψ = 7.5B, 128B, 1T; columns P_os, P_os+g, P_os+g+p.
# DP = 1 is the baseline (2 + 2 + K)Ψ.
ZERO_TABLE1 = {
    7.5e9: {
        1: (120, 120, 120),
        4: (52.5, 41.3, 30),
        16: (35.6, 21.6, 7.5),
        64: (31.4, 16.6, 1.88),
        256: (30.4, 15.4, 0.47),
        1024: (30.1, 15.1, 0.12),
    },
    128e9: {
        1: (2048, 2048, 2048),
        4: (896, 704, 512),
        16: (608, 368, 128),
        64: (536, 284, 32),
        256: (518, 263, 8),
        1024: (513, 257, 2),
    },
    1e12: {
        1: (16000, 16000, 16000),
        4: (7000, 5500, 4000),
        16: (4750, 2875, 1000),
        64: (4187, 2218, 250),
        256: (4046, 2054, 62.5),
        1024: (4011, 2013, 15.6),
    },
}

# Narayanan et al. 2021 (Megatron-LM on GPU clusters), Table 1: GPT, V = 51,200, s = 2048,
# A100 80GB on Selene (8 GPUs + 8 HDR NICs per node), full recompute, interleaved schedule.
# (params B, heads, hidden, layers, tp, pp, gpus, global batch, achieved TFLOP/s per GPU)
MEGATRON_2021_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]

# Korthikanti et al. 2022, Table 3 configurations (micro-batch 1, s = 2048, dp = 1) and the
# model FLOPs utilization published with them (Megatron-LM README): TP + SP + selective recompute.
# (name, heads, hidden, layers, tp, pp, gpus, global batch, MFU)
KORTHIKANTI_2022_MFU = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 0.415),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 0.514),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 0.560),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 0.563),
]


def paper_rounding_matches(value: float, printed: float) -> bool:
    """True if `value` prints as `printed` at the paper's precision: rounded (41.25 → 41.3)
    or truncated (4187.5 → 4187), the two conventions ZeRO's Table 1 mixes."""
    s = repr(float(printed))
    d = 0 if float(printed).is_integer() else len(s.split(".")[1])
    scale = 10**d
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
                rows.append(
                    dict(
                        params=psi,
                        dp=dp,
                        stage=stage,
                        predicted=got,
                        published=pub,
                        error=got / pub - 1,
                        match=paper_rounding_matches(got, pub),
                    )
                )
    return rows


# Narayanan et al. 2021, Table 2: PTD-P against ZeRO-3 without model parallelism (A100, Selene),
# (scheme, params B, tp, pp, gpus, global batch, micro-batch, TFLOP/s per GPU).
MEGATRON_2021_TABLE2 = [
    ("ZeRO-3", 174.6, 1, 1, 384, 1536, 4, 144),
    ("ZeRO-3", 174.6, 1, 1, 768, 1536, 2, 88),
    ("ZeRO-3", 174.6, 1, 1, 1536, 1536, 1, 44),
    ("ZeRO-3", 529.6, 1, 1, 640, 2560, 4, 138),
    ("ZeRO-3", 529.6, 1, 1, 1120, 2240, 2, 98),
    ("ZeRO-3", 529.6, 1, 1, 2240, 2240, 1, 48),
    ("PTD-P", 174.6, 8, 12, 384, 1536, 1, 153),
    ("PTD-P", 174.6, 8, 12, 768, 1536, 1, 149),
    ("PTD-P", 174.6, 8, 12, 1536, 1536, 1, 141),
    ("PTD-P", 529.6, 8, 35, 560, 2240, 1, 171),
    ("PTD-P", 529.6, 8, 35, 1120, 2240, 1, 167),
    ("PTD-P", 529.6, 8, 35, 2240, 2240, 1, 159),
]
_SHAPES = {174.6: (96, 12288, 96), 529.6: (105, 20480, 128)}

# Korthikanti et al. 2022, Table 5: seconds per iteration (Table 3's configurations, micro-batch 1,
# s = 2048, dp = 1): (name, heads, hidden, layers, tp, pp, gpus, batch, selective + SP, full without SP).
KORTHIKANTI_2022_TABLE5 = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 1.10, 1.42),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 13.75, 18.13),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 37.83, 49.05),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 71.49, 94.42),
]

# BLOOM-176B (BigScience 2022, model card and training logs): 384 A100 80GB on Jean Zay, tp4 pp12 dp8,
# micro-batch 2, global batch 2048, s 2048, full recompute, ZeRO-1, no SP, no dropout, ALiBi, tied
# embeddings, V 250,880; 70 layers, h 14336, 112 heads. 149.8 TFLOP/s per GPU (hardware FLOPs, the
# logs' Narayanan Eq. 3).
BLOOM = dict(
    layers=70,
    hidden=14336,
    heads=112,
    vocab=250880,
    seq=2048,
    global_batch=2048,
    micro_batch=2,
    gpus=384,
    gpu="a100",
    tp=4,
    pp=12,
    zero_stage=1,
    recompute="full",
    sequence_parallel=False,
    position_embeddings=False,
    dropout=False,
    topology="jean-zay-a100",
    flash_attention=False,
)
BLOOM_TFLOPS = 149.8

# Dubey et al. 2024 (The Llama 3 Herd of Models), Table 4: Llama 3 405B on H100 (RoCE, 400 Gb/s per GPU),
# 16M-token batches, BF16, no activation recompute: (gpus, tp, cp, pp, dp, seq, TFLOP/s per GPU, MFU).
LLAMA3_TABLE4 = [
    (8192, 8, 1, 16, 64, 8192, 430, 0.43),
    (16384, 8, 1, 16, 128, 8192, 400, 0.41),
    (16384, 8, 16, 16, 8, 131072, 380, 0.38),
]


# NVIDIA 2024, Nemotron-4 340B Technical Report, Table 2: H100 (DGX H100, InfiniBand), tp8 pp12, ramping the
# batch with data parallelism: (gpus, dp, global batch, seconds per iteration, MFU). 96 layers, h 18432,
# 96 heads, GQA 8, squared-ReLU MLP of 73728, V 256000, s 4096, untied, no dropout, no recompute.
NEMOTRON4_TABLE2 = [(1536, 16, 768, 10.3, 0.424), (3072, 32, 1536, 10.3, 0.423), (6144, 64, 2304, 8.0, 0.410)]
NEMOTRON4 = ModelShape(
    96,
    18432,
    96,
    256000,
    4096,
    768,
    "Nemotron-4 340B (NVIDIA 2024)",
    kv_heads=8,
    ffn_hidden=73728,
    tied_embeddings=False,
    position_embeddings=False,
    dropout=False,
)

# Megatron-Bridge performance summary (NVIDIA-NeMo/Megatron-Bridge, docs/performance-summary*.md), BF16 MoE
# pre-training rows, token-dropless with forced expert balance: (model, system, gpus, global batch, micro-batch,
# tp, pp, vp, ep, model TFLOP/s per GPU, release). Their model FLOPs count the causal half of attention
# (Megatron-LM's num_floating_point_operations).
_L = dict(gated_mlp=True, tied_embeddings=False, position_embeddings=False, dropout=False)
MOE_MODELS = {
    "gpt-oss-120b": ModelShape(
        36,
        2880,
        64,
        201088,
        4096,
        1280,
        "gpt-oss-120b (OpenAI 2025 model card): 36 layers, "
        "h 2880, 64 heads of 64, GQA 8, 128 experts top-4 of f 2880, V 201088",
        kv_heads=8,
        head_dim=64,
        ffn_hidden=2880,
        experts=128,
        top_k=4,
        expert_ffn_hidden=2880,
        **_L,
    ),
    "qwen3-235b-a22b": ModelShape(
        94,
        4096,
        64,
        151936,
        4096,
        8192,
        "Qwen3-235B-A22B (Qwen 2025): 94 layers, h 4096, "
        "64 heads of 128, GQA 4, 128 experts top-8 of f 1536, V 151936",
        kv_heads=4,
        head_dim=128,
        ffn_hidden=12288,
        experts=128,
        top_k=8,
        expert_ffn_hidden=1536,
        **_L,
    ),
}
MEGATRON_BRIDGE_MOE = [
    ("deepseek-v3", "gb200", 256, 4096, 1, 1, 4, 4, 64, 782, "25.11"),
    ("qwen3-235b-a22b", "gb200", 256, 8192, 1, 1, 8, 3, 32, 728, "25.11"),
    ("gpt-oss-120b", "h100", 64, 1280, 1, 1, 4, 1, 8, 163, "26.02"),
    ("gpt-oss-120b", "gb200", 64, 1280, 4, 1, 1, 1, 64, 428, "26.02"),
]


def megatron_bridge_moe(assumptions=None) -> list[dict]:
    """MoE rows: model TFLOP/s per GPU (causal attention count), BF16, ZeRO-1 (distributed optimizer)."""
    rows = []
    for name, gpu, n, B, b, t, p, v, ep, pub, rel in MEGATRON_BRIDGE_MOE:
        M = MOE_MODELS.get(name) or MODELS[name]
        shape = (M.layers, M.hidden, M.heads, M.vocab, M.seq, B, b, n, gpu)
        e = estimate(
            *shape,
            tp=t,
            pp=p,
            v=v,
            ep=ep,
            zero_stage=1,
            recompute=None,
            assumptions=assumptions,
            **M.arch_kwargs(),
        )
        got = M.model_flops(B, causal=True) / e.step_time / n / 1e12
        rows.append(_row(f"Megatron-Bridge {rel} (MoE, BF16)", f"{name} {n} {gpu}", pub, got, "TFLOP/s", e))
    return rows


_CACHE: dict = {}


def estimate(*args, **kw):
    """`plan.estimate`, remembered: several tables share configurations (Korthikanti's Table 5 and its
    MFU rows are the same runs). The tables below pass the model and batch as one `shape` tuple, in
    estimate's positional order: layers, hidden, heads, vocab, seq, global batch, micro-batch, GPUs, GPU."""
    key = (args, tuple(sorted((k, repr(x)) for k, x in kw.items())))
    if key not in _CACHE:
        _CACHE[key] = _estimate(*args, **kw)
    return _CACHE[key]


def _v(layers_per_stage: int) -> int:
    """The same rule on every Megatron row: the smallest v > 1 dividing the layers per stage."""
    return next(x for x in (2, 3, 5, 7) if layers_per_stage % x == 0)


def _row(source, name, published, predicted, metric, e, **extra) -> dict:
    return dict(
        source=source,
        name=name,
        metric=metric,
        published=published,
        predicted=predicted,
        error=predicted / published - 1,
        estimate=e,
        **extra,
    )


def megatron_table2(assumptions=None) -> list[dict]:
    """Narayanan 2021 Table 2: TFLOP/s per GPU of PTD-P (interleaved, full recompute) and of
    DeepSpeed ZeRO-3 without model parallelism (full recompute; its prefetch overlaps compute)."""
    rows = []
    for scheme, P, t, p, n, B, b, pub in MEGATRON_2021_TABLE2:
        l, h, a = _SHAPES[P]
        kw = dict(zero_stage=3, overlap_dp=True) if scheme == "ZeRO-3" else dict(zero_stage=0, v=_v(l // p))
        shape = (l, h, a, 51200, 2048, B, b, n, "a100")
        e = estimate(
            *shape,
            tp=t,
            pp=p,
            recompute="full",
            sequence_parallel=False,
            flash_attention=False,
            assumptions=assumptions,
            **kw,
        )
        rows.append(
            _row("Narayanan 2021 Table 2", f"{scheme} {P:g}B {n} GPUs", pub, e.tflops_per_gpu, "TFLOP/s", e)
        )
    return rows


def korthikanti_table5(assumptions=None) -> list[dict]:
    """Korthikanti 2022 Table 5: seconds per iteration, selective recompute + SP and full recompute."""
    rows = []
    for name, a, h, l, t, p, n, B, sel, full in KORTHIKANTI_2022_TABLE5:
        v = 1 if p == 1 else _v(l // p)
        for label, rc, sp, pub in (("selective+SP", "selective", True, sel), ("full", "full", False, full)):
            shape = (l, h, a, 51200, 2048, B, 1, n, "a100")
            e = estimate(
                *shape,
                tp=t,
                pp=p,
                v=v,
                zero_stage=1,
                recompute=rc,
                sequence_parallel=sp,
                flash_attention=False,
                assumptions=assumptions,
            )
            rows.append(
                _row("Korthikanti 2022 Table 5", f"{name} {label}", pub, e.step_time, "s/iteration", e)
            )
    return rows


def bloom_row(assumptions=None) -> list[dict]:
    e = estimate(**BLOOM, assumptions=assumptions)
    return [
        _row(
            "BLOOM-176B (BigScience 2022)", "176B tp4 pp12 dp8", BLOOM_TFLOPS, e.tflops_per_gpu, "TFLOP/s", e
        )
    ]


def llama3_table4(assumptions=None) -> list[dict]:
    """Llama 3 405B, Table 4: MFU. The paper balances 126 layers over 16 stages with one layer fewer
    on the first and last; it does not state v: we use v = 4 interleaved chunks of ~2 layers.

    Its MFU counts the causal half of attention (our reading, not stated: with the full square
    its 131k-token row would be 14 points higher than its 8k rows at equal TFLOP/s per GPU), so
    the predicted MFU is converted to that count."""
    rows = []
    for n, t, c, p, d, s, tf, pub in LLAMA3_TABLE4:
        shape = (126, 16384, 128, 128256, s, 16 * 2**20 // s, 1, n, "h100")
        e = estimate(
            *shape,
            tp=t,
            pp=p,
            cp=c,
            v=4,
            zero_stage=1,
            recompute=None,
            kv_heads=8,
            ffn_hidden=53248,
            gated_mlp=True,
            tied_embeddings=False,
            position_embeddings=False,
            dropout=False,
            topology="h100-roce",
            assumptions=assumptions,
        )
        M = ModelShape(126, 16384, 128, 128256, s, 1, **{k: e.config[k] for k in ARCH_FIELDS})
        mfu = e.mfu * M.model_flops(1, causal=True) / M.model_flops(1)
        rows.append(_row("Llama 3 (Dubey 2024) Table 4", f"405B {n} GPUs cp{c} s{s}", pub, mfu, "MFU", e))
    return rows


def nemotron4_table2(assumptions=None) -> list[dict]:
    """Nemotron-4 340B: seconds per iteration. Megatron-Core with the distributed optimizer and its
    gradient/parameter overlap; v by the same rule as Megatron's tables (8 layers per stage: v = 2)."""
    M, rows = NEMOTRON4, []
    for n, d, B, t, _ in NEMOTRON4_TABLE2:
        shape = (M.layers, M.hidden, M.heads, M.vocab, M.seq, B, 1, n, "h100")
        e = estimate(
            *shape,
            tp=8,
            pp=12,
            v=_v(8),
            zero_stage=1,
            recompute=None,
            overlap_dp=True,
            assumptions=assumptions,
            **M.arch_kwargs(),
        )
        rows.append(
            _row("Nemotron-4 340B (NVIDIA 2024) Table 2", f"340B {n} GPUs", t, e.step_time, "s/iteration", e)
        )
    return rows


def public_tables(assumptions=None) -> list[dict]:
    """Every published throughput the planner is checked against, one row each."""
    return (
        [
            _row(
                "Narayanan 2021 Table 1",
                f"{r['params_published']:g}B {r['gpus']} GPUs",
                r["published"],
                r["predicted"],
                "TFLOP/s",
                r["estimate"],
            )
            for r in megatron_table(assumptions)
        ]
        + megatron_table2(assumptions)
        + korthikanti_table5(assumptions)
        + [
            _row(
                "Korthikanti 2022 / Megatron README",
                f"{r['model']} MFU",
                r["published"],
                r["predicted"],
                "MFU",
                r["estimate"],
            )
            for r in korthikanti_mfu_table(assumptions)
        ]
        + bloom_row(assumptions)
        + llama3_table4(assumptions)
        + nemotron4_table2(assumptions)
    )


def summary(rows) -> dict:
    errs = [abs(r["error"]) for r in rows]
    return dict(rows=len(rows), mean=sum(errs) / len(errs), worst=max(errs))


def megatron_table(assumptions=None) -> list[dict]:
    """Megatron 2021 Table 1: parameter counts and TFLOP/s per GPU, predicted vs published.

    Configuration the paper states: full recompute, no sequence parallelism (it came in
    2022), no distributed optimizer (ZeRO-0), interleaved schedule. It does not state the
    micro-batch size or v: we use b = 1 and the smallest v > 1 that divides the layers per
    stage (2, or 3 when l/p is odd), the same rule on every row."""
    rows = []
    for P, a, h, l, t, p, n, B, pub in MEGATRON_2021_TABLE1:
        v = 1 if p == 1 else _v(l // p)
        shape = (l, h, a, 51200, 2048, B, 1, n, "a100")
        e = estimate(
            *shape,
            tp=t,
            pp=p,
            v=v,
            zero_stage=0,
            recompute="full",
            sequence_parallel=False,
            flash_attention=False,
            assumptions=assumptions,
        )
        rows.append(
            dict(
                params_published=P,
                params=num_params(l, h, 51200, 2048) / 1e9,
                tp=t,
                pp=p,
                v=v,
                gpus=n,
                batch=B,
                predicted=e.tflops_per_gpu,
                published=pub,
                error=e.tflops_per_gpu / pub - 1,
                bubble=e.bubble_fraction,
                estimate=e,
            )
        )
    return rows


def korthikanti_mfu_table(assumptions=None) -> list[dict]:
    """Korthikanti 2022's MFU (TP + SP + selective recompute, dp = 1) predicted vs published,
    with the same v rule as `megatron_table`."""
    rows = []
    for name, a, h, l, t, p, n, B, pub in KORTHIKANTI_2022_MFU:
        v = 1 if p == 1 else _v(l // p)
        shape = (l, h, a, 51200, 2048, B, 1, n, "a100")
        e = estimate(
            *shape,
            tp=t,
            pp=p,
            v=v,
            zero_stage=1,
            recompute="selective",
            sequence_parallel=True,
            flash_attention=False,
            assumptions=assumptions,
        )
        rows.append(
            dict(
                model=name,
                tp=t,
                pp=p,
                v=v,
                gpus=n,
                predicted=e.mfu,
                published=pub,
                error=e.mfu / pub - 1,
                estimate=e,
            )
        )
    return rows


def selective_recompute_savings(seq: int, hidden: int, heads: int, tp: int = 8) -> float:
    """Fraction of activation memory selective recompute removes under TP + SP:
    (5as/h) / (34 + 5as/h). Korthikanti 2022 Sec. 4.3: 70% for GPT-3, 65% for MT-NLG."""
    full = activation_bytes_per_layer(seq, 1, hidden, heads, tp, True, None)
    sel = activation_bytes_per_layer(seq, 1, hidden, heads, tp, True, "selective")
    return 1 - sel / full
