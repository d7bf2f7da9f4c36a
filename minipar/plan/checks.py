"""Every check `estimate` makes before it models anything, in one place (`minipar.validation`).

Each problem is one line saying how to fix it; all of them are listed at once
(`ConfigError`, a ValueError)."""

from __future__ import annotations

from ..validation import Problems
from .formulas import RECOMPUTE
from .hardware import get_gpu, get_link
from .pipeline import PIPELINE_SCHEDULES, SCHEDULE_ALIASES
from .topology import Topology, get_topology

__all__ = ["check_layout"]


def _lookup(p: Problems, field: str, fn, value):
    try:
        return fn(value)
    except ValueError as e:
        p.add(f"{field}: {e}")
        return None


def check_layout(
    layers,
    hidden,
    heads,
    vocab,
    seq,
    global_batch,
    micro_batch,
    gpus,
    gpu,
    tp,
    pp,
    dp,
    cp,
    v,
    zero_stage,
    recompute,
    schedule,
    stage_layers,
    ep,
    cp_kind,
    topology,
    kv_heads,
    ffn_hidden,
    head_dim,
    attention_params,
    experts,
    top_k,
    shared_experts,
    expert_ffn_hidden,
    first_dense_layers,
    inter_node=None,
    **_,
):
    """Return (dp, schedule, micro-batches per pipeline, GPU, Topology) or raise ConfigError."""
    p = Problems()
    ok = all(
        [
            p.integer(k, x)
            for k, x in dict(
                layers=layers,
                hidden=hidden,
                heads=heads,
                vocab=vocab,
                seq=seq,
                global_batch=global_batch,
                micro_batch=micro_batch,
                gpus=gpus,
                tp=tp,
                pp=pp,
                cp=cp,
                v=v,
                ep=ep,
            ).items()
        ]
    )
    for k, x in dict(
        kv_heads=kv_heads,
        ffn_hidden=ffn_hidden,
        head_dim=head_dim,
        attention_params=attention_params,
        expert_ffn_hidden=expert_ffn_hidden,
    ).items():
        if x is not None:
            ok &= p.integer(k, x)
    ok &= (
        p.integer("experts", experts, low=0)
        & p.integer("top_k", top_k)
        & p.integer("shared_experts", shared_experts, low=0)
        & p.integer("first_dense_layers", first_dense_layers, low=0)
    )
    p.choice("zero_stage", zero_stage, (0, 1, 2, 3))
    p.choice("recompute", recompute, RECOMPUTE)
    p.choice("cp_kind", cp_kind, ("ring", "ulysses"))
    g = _lookup(p, "gpu", get_gpu, gpu)
    topo = _lookup(
        p, "topology", get_topology, topology or (g.topology if g and g.topology else None) or "dgx-h100"
    )
    if g is not None and topology is None and not g.topology:  # a user's GPU: its own links
        topo = Topology(g.name, g.gpus_per_node, g.gpus_per_node, g.intra_node, g.inter_node, g.gpus_per_node)
    if inter_node is not None:
        _lookup(p, "inter_node", get_link, inter_node)
    sched = SCHEDULE_ALIASES.get(schedule, schedule) or (
        "interleaved_1f1b" if isinstance(v, int) and v > 1 else "1f1b"
    )
    if not p.choice("schedule", sched, PIPELINE_SCHEDULES + tuple(SCHEDULE_ALIASES)):
        ok = False
    if not ok:
        p.raise_if_any()
    if dp is None:
        if gpus % (tp * pp * cp):
            p.add(
                f"gpus={gpus} is not divisible by tp*pp*cp={tp * pp * cp}; pick sizes whose product divides "
                "the GPU count"
            )
        dp = max(1, gpus // (tp * pp * cp))
    elif tp * pp * cp * dp != gpus:
        p.add(
            f"tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} = {tp * pp * cp * dp} but gpus={gpus}; leave dp=None to derive it"
        )
    if head_dim is None and hidden % heads:
        p.add(f"hidden={hidden} must be divisible by heads={heads} (or pass head_dim)")
    p.divides("tp", tp, "heads", heads, "each tensor-parallel rank holds whole heads")
    if kv_heads is not None and (heads % kv_heads or (kv_heads % tp and tp % kv_heads)):
        p.add(f"kv_heads={kv_heads} must divide heads={heads} and divide or be a multiple of tp={tp}")
    p.divides("cp", cp, "seq", seq, "each context-parallel rank holds s/c tokens")
    if global_batch % (dp * micro_batch):
        p.add(f"global_batch={global_batch} must be divisible by dp*micro_batch={dp * micro_batch}")
    m = max(1, global_batch // (dp * micro_batch))
    if (v > 1) != (sched == "interleaved_1f1b"):
        p.add(f"v={v} and schedule={schedule!r} disagree: v > 1 means schedule='interleaved_1f1b'")
    if sched == "interleaved_1f1b" and m % pp:
        p.add(f"the interleaved schedule needs micro-batches m={m} divisible by pp={pp}")
    if sched == "dualpipe" and (pp % 2 or m % 2 or m < 2 * pp):
        p.add(f"dualpipe needs an even pp (got {pp}) and an even m >= 2*pp (got m={m})")
    if sched == "dualpipev" and m < 2 * pp:
        p.add(f"dualpipev needs m >= 2*pp = {2 * pp} micro-batches, got m={m}")
    S = pp * v if sched == "interleaved_1f1b" else 2 * pp if sched == "dualpipev" else pp
    if stage_layers is not None:
        sl = list(stage_layers)
        if len(sl) != S or any(not isinstance(n, int) or n < 1 for n in sl) or sum(sl) != layers:
            p.add(
                f"stage_layers={sl} must list {S} stages (pp*v, or 2*pp for dualpipev) of >= 1 layer each, "
                f"summing to layers={layers}"
            )
    elif layers < S:
        p.add(f"layers={layers} cannot fill {S} pipeline stages: lower pp or v")
    if experts:
        if top_k > experts:
            p.add(f"top_k={top_k} must be <= experts={experts}")
        if experts % ep:
            p.add(
                f"experts={experts} must be divisible by ep={ep}: each expert-parallel rank holds whole experts"
            )
        if first_dense_layers >= layers:
            p.add(f"first_dense_layers={first_dense_layers} must be < layers={layers}")
    if (dp * cp) % ep:
        p.add(
            f"ep={ep} must divide dp*cp={dp * cp}: expert parallelism is carved out of the data-parallel ranks"
        )
    if ep > 1 and not experts:
        p.add(f"ep={ep} needs experts > 0 (a dense model has nothing to split)")
    p.raise_if_any()
    return dp, sched, m, g, topo
