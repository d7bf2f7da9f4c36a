"""Step time, throughput and memory of one training layout: `estimate(...)`.

The model, and what it assumes (see `Assumptions`; pass `assumptions=` to change them):

* Compute. Matmuls run at one achievable fraction of the GPU's dense bf16 peak
  (`compute_efficiency`), the same for every model and layout; the FLOPs are
  `hardware_flops` (recompute included), split evenly over the tp × cp × pp × dp GPUs.
  The element-wise kernels (LayerNorm, GeLU, dropout, softmax, residual adds) are bound
  by HBM bandwidth: they move `traffic_factor` × the activation bytes Korthikanti 2022
  counts per layer (forward once, backward twice, a full recompute once more). That
  term is why small models reach a lower fraction of peak than large ones.
* Links. Axes are laid out tp innermost, then cp, dp, pp outermost (Megatron's order).
  An axis whose group fits inside a node uses NVLink, otherwise the node's NICs (one per
  GPU). A ring step costs latency + bytes / (bandwidth × `link_efficiency`); an
  all-reduce is 2(k-1) steps of n/k bytes, all-gather and reduce-scatter k-1
  (Patarasuk & Yuan 2009; NCCL's ring).
* Overlap. TP/SP collectives sit on the critical path (Megatron 2021-22 did not overlap
  them). Pipeline sends are on the critical path, inside the pipeline simulation. CP ring
  attention hides behind the attention math when it is shorter. The DP gradient
  reduction runs after the last backward unless `overlap_dp=True` (then only the last
  layer's share is exposed). The optimizer step is not counted.
* Pipeline. The bubble comes from simulating the schedule (`minipar.pp.simulate`, see
  `pipeline.py`) with the per-micro-batch stage times above.
* Memory. Model states by ZeRO stage (sharded over dp × cp, like Megatron's distributed
  optimizer), plus `activation_bytes_per_gpu`; a layout fits if that is within
  (1 - `memory_reserve`) of the GPU's memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .formulas import (activation_bytes_per_gpu, comm_bytes, context_parallel_layer_bytes, hardware_flops,
                       model_flops, num_params)
from .hardware import GPU, get_gpu, get_link
from .memory import model_state_bytes
from .pipeline import pipeline_makespan

__all__ = ["Assumptions", "ASSUMPTIONS", "Estimate", "estimate", "stage_params", "memory_breakdown"]


@dataclass(frozen=True)
class Assumptions:
    """The model's only constants: one set for every GPU, model and layout."""
    compute_efficiency: float = 0.60   # achieved fraction of dense bf16 peak in the matmuls
    traffic_factor: float = 1.0        # HBM bytes of element-wise kernels per activation byte kept
    flash_attention: bool = False      # True: the s×s scores never reach HBM (Dao et al. 2022)
    link_efficiency: float = 0.80      # nccl-tests bus bandwidth / line rate (A100 NVLink ~230/300 GB/s)
    memory_reserve: float = 0.10       # CUDA context, NCCL and temporary buffers, fragmentation


ASSUMPTIONS = Assumptions()


@dataclass
class Estimate:
    """What `estimate` predicts. Times in seconds, memory in bytes per GPU."""
    config: dict
    gpu: GPU
    num_microbatches: int
    step_time: float
    tflops_per_gpu: float      # hardware FLOP/s per GPU / 1e12 (recompute counted, as Megatron 2021 reports)
    mfu: float                 # model FLOPs (no recompute) / (step_time × gpus × peak)
    memory_per_gpu: float
    memory: dict               # params, grads, optimizer, activations
    fits: bool
    time: dict                 # compute, tp+cp (exposed comm), bubble (incl. p2p), dp (exposed)
    comm: dict                 # per axis: payload / wire bytes per GPU per step, count, link, seconds
    bubble_fraction: float
    tokens_per_second: float = 0.0
    notes: list = field(default_factory=list)

    def explain(self) -> str:
        c, G = self.config, 1e9
        lines = [f"layout  tp={c['tp']} pp={c['pp']} dp={c['dp']} cp={c['cp']} v={c['v']} "
                 f"schedule={c['schedule']} ZeRO-{c['zero_stage']} recompute={c['recompute']} "
                 f"sp={c['sequence_parallel']} micro_batch={c['micro_batch']} m={self.num_microbatches}",
                 f"speed   {self.step_time:.2f} s/step, {self.tflops_per_gpu:.0f} TFLOP/s per GPU, "
                 f"MFU {self.mfu:.1%}, {self.tokens_per_second:,.0f} tokens/s",
                 f"memory  {self.memory_per_gpu / G:.1f} of {self.gpu.memory / G:.0f} GB "
                 f"({'fits' if self.fits else 'DOES NOT FIT'}): "
                 + ", ".join(f"{k} {v / G:.1f}" for k, v in self.memory.items()),
                 "time    " + ", ".join(f"{k} {v:.2f} s" for k, v in self.time.items())
                 + f"; bubble = {self.bubble_fraction:.1%} of the pipeline's time"]
        for axis, x in self.comm.items():
            if x["count"]:
                lines.append(f"comm {axis:<3} {x['wire'] / G:9.2f} GB/GPU/step on the wire over {x['link']:<8}"
                             f" {x['count']:7.0f} ops, {x['seconds']:.2f} s on the critical path")
        return "\n".join(lines + [f"note    {n}" for n in self.notes])


def stage_params(layers: int, hidden: int, vocab: int, seq: int, tp: int, pp: int) -> float:
    """Parameters on the first pipeline stage's GPU: its l/p layers plus the word and
    position embeddings, all split t ways (Megatron's vocab-parallel embedding)."""
    per_layer = 12 * hidden**2 * (1 + 13 / (12 * hidden))
    return (layers / pp * per_layer + (vocab + seq) * hidden) / tp


def memory_breakdown(layers, hidden, heads, vocab, seq, micro_batch, num_microbatches, tp=1, pp=1, dp=1, cp=1,
                     v=1, zero_stage=1, recompute="selective", sequence_parallel=True, schedule="1f1b") -> dict:
    """Bytes per GPU on the first stage: params, grads, optimizer (ZeRO 2020) and activations
    (Korthikanti 2022), with ZeRO sharding over dp × cp."""
    psi, k = stage_params(layers, hidden, vocab, seq, tp, pp), dp * cp
    states = model_state_bytes(psi, k, zero_stage)
    params = 2 * psi / (k if zero_stage == 3 else 1)
    grads = 2 * psi / (k if zero_stage >= 2 else 1)
    acts = activation_bytes_per_gpu(seq, micro_batch, hidden, heads, layers, vocab, tp, pp, cp,
                                    num_microbatches, v, schedule, sequence_parallel, recompute)
    return {"params": params, "grads": grads, "optimizer": states - params - grads, "activations": acts}


def _ring(kind: str, nbytes: float, k: int, link, eff: float) -> float:
    """Seconds for one ring collective of `nbytes` (the logical tensor) over k ranks."""
    if k <= 1 or nbytes <= 0:
        return 0.0
    steps = {"all_reduce": 2 * (k - 1), "all_gather": k - 1, "reduce_scatter": k - 1, "all_to_all": k - 1}[kind]
    return steps * (link.latency + nbytes / k / (link.bandwidth * eff))


def validate(layers, hidden, heads, seq, global_batch, micro_batch, gpus, tp, pp, dp, cp, v, zero_stage,
             schedule) -> tuple[int, str, int]:
    """Check a layout; return (dp, schedule, micro-batches per pipeline). Raises ValueError."""
    for k, x in dict(layers=layers, hidden=hidden, heads=heads, seq=seq, global_batch=global_batch,
                     micro_batch=micro_batch, gpus=gpus, tp=tp, pp=pp, cp=cp, v=v).items():
        if not isinstance(x, int) or x < 1:
            raise ValueError(f"{k} must be a positive integer, got {x!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if dp is None:
        if gpus % (tp * pp * cp):
            raise ValueError(f"gpus={gpus} is not divisible by tp*pp*cp={tp * pp * cp}; pick sizes whose "
                             "product divides the GPU count")
        dp = gpus // (tp * pp * cp)
    if tp * pp * cp * dp != gpus:
        raise ValueError(f"tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} = {tp * pp * cp * dp} but gpus={gpus}; "
                         "leave dp=None to derive it")
    if hidden % heads or heads % tp:
        raise ValueError(f"heads={heads} must divide hidden={hidden} and be divisible by tp={tp}")
    if layers % (pp * v):
        raise ValueError(f"layers={layers} must be divisible by pp*v={pp * v} (each virtual stage gets "
                         "whole layers)")
    if seq % cp:
        raise ValueError(f"seq={seq} must be divisible by cp={cp}")
    if global_batch % (dp * micro_batch):
        raise ValueError(f"global_batch={global_batch} must be divisible by dp*micro_batch={dp * micro_batch}")
    schedule = schedule or ("interleaved" if v > 1 else "1f1b")
    if (v > 1) != (schedule == "interleaved"):
        raise ValueError(f"v={v} and schedule={schedule!r} disagree: v > 1 means schedule='interleaved'")
    m = global_batch // (dp * micro_batch)
    if schedule == "interleaved" and m % pp:
        raise ValueError(f"the interleaved schedule needs micro-batches m={m} divisible by pp={pp}")
    return dp, schedule, m


def estimate(layers, hidden, heads, vocab, seq, global_batch, micro_batch, gpus, gpu="a100", tp=1, pp=1,
             dp=None, cp=1, v=1, zero_stage=1, recompute="selective", sequence_parallel=True, *,
             schedule=None, overlap_dp=False, cp_kind="ring", inter_node=None,
             assumptions: Assumptions | None = None, use_simulator: bool = True) -> Estimate:
    """Predict step time, TFLOP/s per GPU, MFU and memory per GPU of one layout (module docstring)."""
    A, g = assumptions or ASSUMPTIONS, get_gpu(gpu)
    dp, schedule, m = validate(layers, hidden, heads, seq, global_batch, micro_batch, gpus, tp, pp, dp, cp, v,
                               zero_stage, schedule)
    sequence_parallel = bool(sequence_parallel and tp > 1)   # nothing to split at tp = 1
    l_stage, k = layers / pp, dp * cp

    # --- one micro-batch through one stage: matmuls + memory-bound element-wise kernels ----
    peak = g.peak_flops * A.compute_efficiency
    hw = hardware_flops(layers, hidden, vocab, seq, global_batch, recompute)
    fwd = model_flops(layers, hidden, vocab, seq, global_batch) / 3
    matmul = hw / gpus / m / peak
    written = context_parallel_layer_bytes(seq, cp, micro_batch, hidden, heads, tp, sequence_parallel,
                                           "selective" if A.flash_attention else None)
    mem_f = A.traffic_factor * l_stage * written / g.memory_bandwidth
    t_f = matmul * fwd / hw + mem_f
    t_b = matmul * (hw - fwd) / hw + mem_f * (3 if recompute == "full" else 2)
    compute = m * (t_f + t_b)

    # --- links per axis: tp innermost, then cp, dp, pp --------------------------------------
    intra, inter, n, eff = get_link(g.intra_node), get_link(inter_node or g.inter_node), g.gpus_per_node, \
        A.link_efficiency
    link = {"tp": intra if tp <= n else inter, "cp": intra if tp * cp <= n else inter,
            "dp": intra if tp * cp * dp <= n else inter, "pp": intra if tp * cp * dp * pp <= n else inter,
            "ep": intra}
    psi = stage_params(layers, hidden, vocab, seq, tp, pp)
    act = seq // cp * micro_batch * hidden * 2             # one s·b·h bf16 tensor on this GPU

    # TP/SP: 2 collectives per layer forward, 2 backward, +2 when fully recomputing.
    one_tp = _ring("all_reduce", act, tp, link["tp"], eff)
    t_f += l_stage * 2 * one_tp
    t_b += l_stage * (4 if recompute == "full" else 2) * one_tp
    if cp > 1:  # ring attention passes K,V c-1 times (and K,V,dK,dV back): hidden under the math if shorter
        attn = 4 * micro_batch * (seq / cp) * seq * hidden / tp / peak
        hop = link["cp"].latency + 2 * act / tp / (link["cp"].bandwidth * eff)
        if cp_kind == "ring":
            t_f += l_stage * max(0.0, (cp - 1) * hop - attn)
            t_b += l_stage * max(0.0, 2 * (cp - 1) * hop - 2 * attn)
        else:                                          # Ulysses: 4 all-to-alls each way, exposed
            a2a = _ring("all_to_all", act / tp, cp, link["cp"], eff)
            t_f, t_b = t_f + l_stage * 4 * a2a, t_b + l_stage * 4 * a2a
    exposed_tp_cp = m * (t_f + t_b) - compute
    t_p2p = link["pp"].latency + (act / tp if sequence_parallel else act) / (link["pp"].bandwidth * eff)
    makespan, bubble = pipeline_makespan(schedule, pp, m, v, t_f, t_b, t_p2p if pp > 1 else 0.0, use_simulator)

    # DP (+CP, which shares the gradient reduction)
    if zero_stage == 3:
        t_dp = 3 * m * _ring("all_gather", 2 * psi, k, link["dp"], eff)
    elif zero_stage == 2:
        t_dp = (m + 1) * _ring("reduce_scatter", 2 * psi, k, link["dp"], eff)
    else:
        t_dp = _ring("all_reduce", 2 * psi, k, link["dp"], eff)
    exposed_dp = t_dp / l_stage if overlap_dp else t_dp
    step_time = makespan + exposed_dp

    memory = memory_breakdown(layers, hidden, heads, vocab, seq, micro_batch, m, tp, pp, dp, cp, v, zero_stage,
                              recompute, sequence_parallel, schedule)
    total = sum(memory.values())
    usable = g.memory * (1 - A.memory_reserve)
    vol = comm_bytes(layers, hidden, seq, micro_batch, m, psi, tp, pp, dp, cp, v, zero_stage, recompute,
                     sequence_parallel, cp_kind)
    t_tp = m * l_stage * (6 if recompute == "full" else 4) * one_tp
    t_pp = makespan - pipeline_makespan(schedule, pp, m, v, t_f, t_b, 0.0, use_simulator)[0]  # what sends add
    seconds = {"tp": t_tp, "cp": max(0.0, exposed_tp_cp - t_tp), "pp": max(0.0, t_pp), "dp": exposed_dp, "ep": 0.0}
    for axis, x in vol.items():
        x["link"], x["seconds"] = link[axis].name, seconds[axis]
    notes = [] if total <= usable else [
        f"needs {total / 1e9:.1f} GB > {usable / 1e9:.0f} GB usable: raise tp/pp, the ZeRO stage or recompute, "
        "or lower micro_batch"]
    return Estimate(
        config=dict(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=seq, global_batch=global_batch,
                    micro_batch=micro_batch, gpus=gpus, tp=tp, pp=pp, dp=dp, cp=cp, v=v, zero_stage=zero_stage,
                    recompute=recompute, sequence_parallel=sequence_parallel, schedule=schedule,
                    params=num_params(layers, hidden, vocab, seq)),
        gpu=g, num_microbatches=m, step_time=step_time, tflops_per_gpu=hw / step_time / gpus / 1e12,
        mfu=model_flops(layers, hidden, vocab, seq, global_batch) / (step_time * gpus * g.peak_flops),
        memory_per_gpu=total, memory=memory, fits=total <= usable,
        time={"compute": compute, "tp+cp": exposed_tp_cp, "bubble": makespan - m * (t_f + t_b), "dp": exposed_dp},
        comm=vol, bubble_fraction=bubble, tokens_per_second=global_batch * seq / step_time, notes=notes)
