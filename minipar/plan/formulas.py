"""Closed-form counts for a GPT: parameters, FLOPs, activation bytes, communication bytes.

Letters follow the papers: l layers, h hidden, a heads, V vocabulary, s sequence,
b micro-batch, B global batch, t tensor-parallel, p pipeline, v virtual stages
(interleaving), d data-parallel, c context-parallel, e expert-parallel, m
micro-batches per pipeline, Ψ parameters. Every function names its source.

Bytes are counted with 2-byte (bf16/fp16) activations unless `bytes_per_value=`
says otherwise. Communication is counted per GPU per training step, both as the
logical payload of each collective and as what a ring algorithm puts on the wire.
"""

from __future__ import annotations

__all__ = [
    "num_params",
    "model_flops",
    "hardware_flops",
    "mfu",
    "activation_bytes_per_layer",
    "in_flight_microbatches",
    "context_parallel_layer_bytes",
    "activation_bytes_per_gpu",
    "comm_bytes",
    "RECOMPUTE",
]

RECOMPUTE = (None, "selective", "full")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def _positive(**kw) -> None:
    for k, x in kw.items():
        if not x or x < 1:
            raise ValueError(f"{k} must be a positive number, got {x!r}")


def _check_recompute(recompute) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")


def num_params(layers: int, hidden: int, vocab: int, seq: int) -> float:
    """Ψ = 12 l h² (1 + 13/(12h) + (V + s)/(12 l h))  (Narayanan et al. 2021, Sec. 5.1).

    12h² per layer from QKV (3h²), attention output (h²) and the 4h MLP (8h²); 13h from
    biases and LayerNorms; (V + s)h from the word and position embeddings (tied output)."""
    _positive(layers=layers, hidden=hidden, vocab=vocab, seq=seq)
    l, h, V, s = layers, hidden, vocab, seq
    return 12 * l * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def model_flops(layers: int, hidden: int, vocab: int, seq: int, batch: int) -> float:
    """FLOPs one step must do, without recompute: 72 B s l h² (1 + s/(6h) + V/(12 l h)).

    Narayanan et al. 2021, Sec. 5.1 (their Eq. 3 without the recompute pass): forward is
    24Bslh² + 4Bs²lh per layer plus 2BshV for the logits; backward costs twice forward.
    This is the numerator of MFU (Chowdhery et al. 2022, PaLM, App. B; Korthikanti 2022)."""
    _positive(layers=layers, hidden=hidden, vocab=vocab, seq=seq, batch=batch)
    l, h, V, s, B = layers, hidden, vocab, seq, batch
    return 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))


def hardware_flops(layers: int, hidden: int, vocab: int, seq: int, batch: int, recompute=None) -> float:
    """FLOPs the GPUs execute, recompute included.

    full:      96 B s l h² (1 + s/(6h) + V/(16 l h))  (Narayanan 2021, Eq. 3): one extra
               forward of every layer (the logits layer is not recomputed).
    selective: adds one forward of the attention core, QKᵀ and softmax·V: 4Bs²h per layer
               (Korthikanti 2022, Sec. 5). Megatron's published HFU numbers count s/(6h)
               more (see the planner notebook); we count what the kernels execute."""
    _check_recompute(recompute)
    l, h, s, B = layers, hidden, seq, batch
    extra = {None: 0.0, "selective": 4 * B * s**2 * l * h, "full": 24 * B * s * l * h**2 * (1 + s / (6 * h))}[
        recompute
    ]
    return model_flops(layers, hidden, vocab, seq, batch) + extra


def mfu(flops_per_step: float, step_time: float, gpus: int, peak_flops: float) -> float:
    """Model FLOPs utilization = model FLOPs per second / (gpus × peak)  (Chowdhery et al. 2022,
    PaLM, App. B). Pass `hardware_flops` instead to get HFU."""
    if step_time <= 0 or peak_flops <= 0:
        raise ValueError("step_time and peak_flops must be positive")
    _positive(gpus=gpus)
    return flops_per_step / (step_time * gpus * peak_flops)


def activation_bytes_per_layer(
    seq: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute=None,
    bytes_per_value: float = 2,
) -> float:
    """Activation bytes one transformer layer keeps for backward (Korthikanti et al. 2022, Table 2).

        no recompute, TP:            s b h (10 + 24/t + 5as/(ht))
        no recompute, TP + SP:       s b h (34/t + 5as/(ht))
        selective recompute, TP:     s b h (10 + 24/t)
        selective recompute, TP+SP:  s b h (34/t)
        full recompute:              2 s b h   (only the layer input; 2sbh/t with SP)

    The paper counts 2-byte values and 1-byte dropout masks; `bytes_per_value` scales the
    whole count by bytes_per_value/2 (masks included, a slight overcount for fp32)."""
    _positive(seq=seq, micro_batch=micro_batch, hidden=hidden, heads=heads, tp=tp)
    _check_recompute(recompute)
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    s, b, h, a, t = seq, micro_batch, hidden, heads, tp
    if recompute == "full":
        per = 2 / t if sequence_parallel else 2
    else:
        attention = 0 if recompute == "selective" else 5 * a * s / (h * t)
        per = (34 / t if sequence_parallel else 10 + 24 / t) + attention
    return s * b * h * per * bytes_per_value / 2


def in_flight_microbatches(schedule: str, pp: int, num_microbatches: int, v: int = 1) -> float:
    """How many micro-batches' activations the first stage holds at its peak, in units of
    one micro-batch through that stage's l/p layers.

    gpipe: m (all forwards before any backward; Huang et al. 2019).
    1f1b and zb-h1: p (Narayanan et al. 2021 Sec. 2.2; Qi et al. 2024 ZB-H1 keeps 1F1B's memory).
    interleaved: p (1 + (p-1)/(p v))  (Korthikanti et al. 2022, Sec. 4.2.3)."""
    _positive(pp=pp, num_microbatches=num_microbatches, v=v)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    p, m = pp, num_microbatches
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved":
        return min(m, p) * (1 + (p - 1) / (p * v))
    return float(min(m, p))


def context_parallel_layer_bytes(
    seq, cp, micro_batch, hidden, heads, tp=1, sequence_parallel=False, recompute=None, bytes_per_value=2
) -> float:
    """`activation_bytes_per_layer` on one of c context-parallel ranks: its s/c queries keep
    s/c of every per-token tensor, but their attention scores span all s keys, so the 5as/h
    term shrinks by c, not c² (Liu et al. 2023, ring attention)."""
    if seq % cp:
        raise ValueError(f"seq={seq} must be divisible by cp={cp}")
    s = seq // cp
    out = activation_bytes_per_layer(
        s, micro_batch, hidden, heads, tp, sequence_parallel, recompute, bytes_per_value
    )
    if recompute is None and cp > 1:
        scores = out - activation_bytes_per_layer(
            s, micro_batch, hidden, heads, tp, sequence_parallel, "selective", bytes_per_value
        )
        out += (cp - 1) * scores
    return out


def activation_bytes_per_gpu(
    seq: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    layers: int,
    vocab: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    num_microbatches: int = 1,
    v: int = 1,
    schedule: str = "1f1b",
    sequence_parallel: bool = False,
    recompute=None,
    bytes_per_value: float = 2,
) -> float:
    """Peak activation bytes on the busiest GPU (the first pipeline stage).

    (l/p) layers × in-flight micro-batches × per-layer bytes, plus the embedding's dropout
    mask s b h p / t (Korthikanti 2022, Sec. 4.3; 1 byte per value). When p = 1 the same
    GPU also holds the output layer: 4 s b h (1 + V/h) / t (LayerNorm and logits input, fp32
    logits; Korthikanti 2022 Sec. 4.3). Full recompute adds the working set of the one layer
    being recomputed. Context parallelism divides the sequence: s/c per GPU."""
    if seq % cp:
        raise ValueError(f"seq={seq} must be divisible by cp={cp}")
    s = seq // cp
    inflight = in_flight_microbatches(schedule, pp, num_microbatches, v)
    per_layer = context_parallel_layer_bytes(
        seq, cp, micro_batch, hidden, heads, tp, sequence_parallel, recompute, bytes_per_value
    )
    total = (layers / pp) * inflight * per_layer
    if recompute == "full":  # one layer's activations are live while it is recomputed
        total += context_parallel_layer_bytes(
            seq, cp, micro_batch, hidden, heads, tp, sequence_parallel, None, bytes_per_value
        )
    sbh = s * micro_batch * hidden * bytes_per_value / 2
    total += sbh * min(pp, num_microbatches) / 2 / (tp if sequence_parallel else 1)
    if pp == 1:
        total += 4 * sbh * (1 + vocab / hidden) / tp
    return total


def comm_bytes(
    layers: int,
    hidden: int,
    seq: int,
    micro_batch: int,
    num_microbatches: int,
    params_per_gpu: float,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    cp: int = 1,
    v: int = 1,
    zero_stage: int = 1,
    recompute=None,
    sequence_parallel: bool = False,
    cp_kind: str = "ring",
    ep: int = 1,
    moe_layers: int = 0,
    top_k: int = 1,
    grad_bytes: float = 2,
    bytes_per_value: float = 2,
) -> dict:
    """Bytes per GPU per step for each axis: {axis: {"payload", "wire", "count"}}.

    Ring cost per GPU (Patarasuk & Yuan 2009; NCCL docs): all-reduce of n bytes over k ranks
    puts 2(k-1)/k·n on the wire; all-gather / reduce-scatter (k-1)/k·n; all-to-all (k-1)/k·n.

    dp:  ZeRO 0-1 reduce gradients once per step (an all-reduce, or reduce-scatter +
         all-gather of parameters: the same 2Ψ on the wire; Rajbhandari et al. 2020, Sec. 7).
         ZeRO-2 keeps only its gradient shard, so with m micro-batches of accumulation it
         reduce-scatters every micro-batch: (m + 1)Ψ. ZeRO-3 all-gathers parameters in
         forward and backward and reduce-scatters gradients, every micro-batch: 3mΨ. Megatron's
         distributed optimizer shards over dp×cp, so cp ranks join this reduction.
    tp:  per layer per micro-batch, 2 all-reduces forward + 2 backward of s b h (Shoeybi 2019);
         with SP each becomes an all-gather + reduce-scatter, same wire bytes (Korthikanti 2022);
         full recompute repeats the 2 forward ones.
    pp:  each micro-batch sends its activation forward and its gradient back at every one
         of the v stage boundaries per GPU: 2·v·m sends of s b h (/t with SP: scatter-gather,
         Narayanan 2021 Sec. 4.1).
    cp:  ring attention passes the K and V blocks c-1 times forward and K, V, dK, dV
         backward (Liu et al. 2023); Ulysses all-to-alls q, k, v, o forward and back
         (Jacobs et al. 2023).
    ep:  dispatch and combine all-to-alls of top_k × tokens per MoE layer, forward and
         backward (Lepikhin 2020 GShard; Fedus 2021 Switch Transformer).
    """
    if cp_kind not in ("ring", "ulysses"):
        raise ValueError(f"cp_kind must be 'ring' or 'ulysses', got {cp_kind!r}")
    _check_recompute(recompute)
    l_stage, m, t = layers / pp, num_microbatches, tp
    act = (seq / cp) * micro_batch * hidden * bytes_per_value  # one s b h tensor on this GPU
    out = {}

    def add(axis, payload, wire_factor, count):
        out[axis] = {"payload": payload, "wire": payload * wire_factor, "count": count}

    grads = params_per_gpu * grad_bytes
    k = dp * cp
    if zero_stage == 3:  # parameters gathered twice and gradients reduce-scattered, per micro-batch
        add("dp", 3 * m * grads, (k - 1) / k, 3 * m if k > 1 else 0)
    elif zero_stage == 2:  # sharded gradients cannot accumulate: reduce-scatter every micro-batch
        add("dp", (m + 1) * grads, (k - 1) / k, m + 1 if k > 1 else 0)
    else:  # one all-reduce (ZeRO-1: reduce-scatter + all-gather) per step
        add("dp", grads, 2 * (k - 1) / k, 1 if k > 1 else 0)
    n_tp = 4 + (2 if recompute == "full" else 0)
    add("tp", n_tp * l_stage * m * act, 2 * (t - 1) / t if t > 1 else 0, n_tp * l_stage * m if t > 1 else 0)
    p2p = act / t if sequence_parallel else act
    add("pp", 2 * v * m * p2p if pp > 1 else 0.0, 1.0, 2 * v * m if pp > 1 else 0)
    if cp_kind == "ring":
        kv = 2 * act / t
        add("cp", 3 * (cp - 1) * l_stage * m * kv, 1.0, 3 * (cp - 1) * l_stage * m if cp > 1 else 0)
    else:
        add("cp", 8 * l_stage * m * act / t, (cp - 1) / cp, 8 * l_stage * m if cp > 1 else 0)
    tokens = act * top_k
    add(
        "ep",
        4 * moe_layers / pp * m * tokens,
        (ep - 1) / ep if ep > 1 else 0,
        4 * moe_layers / pp * m if ep > 1 else 0,
    )
    return out
