"""Step time, throughput and memory of one training layout: `estimate(...)`.

What it models (each constant has a physical reason and a source; see `Assumptions` and
`hardware.py`; none is fitted to one table):

* **Matmuls** run at the GPU's measured maximum achievable matmul FLOP/s (MAMF, per
  generation) times the wave-quantization efficiency of their real shape: a GEMM of
  M x N is cut into 128 x 256 output tiles spread over the SMs in waves, and a last
  partial wave idles the rest (NVIDIA, "Matrix Multiplication Background User's Guide").
  Small models at large t lose here; big GEMMs do not.
* **Attention core** (QKᵀ, softmax·V): with fused flash attention (the default: every
  modern run uses it) the executed FLOPs skip the causal half and run at the GPU's flash
  efficiency; the backward costs 2.5x the forward (it recomputes QKᵀ; Dao 2023). Without
  it (Megatron 2021) the full s x s square runs as batched GEMMs and its softmax/dropout
  traffic goes through HBM.
* **Element-wise kernels** (norms, activations, dropout, residuals; MoE's permutation of each
  token's top-k copies around the all-to-all) are HBM-bound: they move `traffic_factor` x the
  activation bytes the layer produces (forward once, backward twice, full recompute once
  more), at the GPU's HBM bandwidth. A GEMM too small or skinny to be compute-bound costs
  at least its operands' HBM traffic (the roofline; Williams et al. 2009).
* **Communication** goes through `topology.collective_time` (NCCL's ring/tree choice,
  hierarchical across NVLink domains, SHARP). Axes are laid out tp innermost, then cp, ep,
  dp, pp (Megatron's order). Overlap switches, defaulting to Megatron-LM's defaults:
  `overlap_tp` (--tp-comm-overlap, off): TP collectives hide behind that layer's GEMMs;
  `overlap_dp` (--overlap-grad-reduce/--overlap-param-gather, off): the gradient reduce-scatter
  hides behind the last backward and the parameter all-gather behind the first forward (with
  ZeRO-3: each micro-batch's gathers behind its compute, the prefetch FSDP and DeepSpeed do);
  `overlap_pp` (--overlap-p2p-communication, on): the interleaved schedule's sends hide
  behind compute. CP ring attention hides behind the attention math when shorter. MoE's
  all-to-alls are exposed, except inside DualPipe's F&B pairs, which the simulator prices
  (`t_fb`): an overlapped pair costs max(compute, communication) of its two halves.
* **Pipeline**: every (virtual) stage gets its own times (its layers; the embedding on the
  first, the head and loss on the last), and `minipar.pp.simulate` runs the schedule.
  `stage_layers` gives the partition; otherwise equal stages, or `pp.balance_stages` when
  no equal split exists (Llama 3 405B: 126 layers on 16 stages).
* **Optimizer**: Adam's step is HBM-bound: `optimizer_bytes` per parameter it updates.
* **Memory**: the busiest stage's model states by ZeRO stage (dense parameters sharded over
  dp x cp, experts over the dp x cp / ep ranks that replicate them) plus its activations
  (`ModelShape.layer_activation_bytes` x the micro-batches it holds in flight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..validation import ConfigError
from .arch import ModelShape
from .checks import check_layout
from .formulas import comm_bytes
from .hardware import GPU, get_link
from .memory import stage_memory, stage_params
from .pipeline import SCHEDULE_ALIASES, _rank_work, pipeline_makespan
from .topology import Topology, collective_time, placement

__all__ = ["Assumptions", "ASSUMPTIONS", "Estimate", "estimate", "stage_params", "memory_breakdown"]


@dataclass(frozen=True)
class Assumptions:
    """The model's only free constants: one set for every GPU, model and layout."""

    flash_attention: bool = True  # fused attention: the s×s scores never reach HBM (Dao et al. 2022)
    traffic_factor: float = 1.0  # HBM bytes of element-wise kernels per activation byte a layer produces
    memory_reserve: float = 0.10  # CUDA context, NCCL buffers, fragmentation (PyTorch allocator)
    tile: tuple = (128, 256)  # cuBLAS/CUTLASS output tile of large bf16 GEMMs (M x N)
    optimizer_bytes: float = (
        30.0  # Adam: fp32 master, m, v read+written (24), fp32 grad read (4), bf16 param (2)
    )
    kernel_efficiency: float = (
        0.80  # GEMM and attention rate inside a training step / their isolated best (below)
    )


ASSUMPTIONS = Assumptions()


@dataclass
class Estimate:
    """What `estimate` predicts. Times in seconds, memory in bytes per GPU."""

    config: dict
    gpu: GPU
    num_microbatches: int
    step_time: float
    tflops_per_gpu: float  # hardware FLOP/s per GPU / 1e12 (recompute counted, as Megatron 2021 reports)
    mfu: float  # model FLOPs (no recompute) / (step_time × gpus × peak)
    memory_per_gpu: float
    memory: dict  # params, grads, optimizer, activations (the busiest stage)
    fits: bool
    time: dict  # compute, tp+cp (exposed comm), bubble (incl. p2p), dp (exposed), optimizer
    comm: dict  # per axis: payload / wire bytes per GPU per step, count, link, seconds
    bubble_fraction: float
    tokens_per_second: float = 0.0
    notes: list = field(default_factory=list)
    stages: list = field(default_factory=list)  # per stage: layers, t_f, t_b, memory

    def explain(self) -> str:
        c, G = self.config, 1e9
        lines = [
            f"layout  tp={c['tp']} pp={c['pp']} dp={c['dp']} cp={c['cp']} ep={c['ep']} v={c['v']} "
            f"schedule={c['schedule']} ZeRO-{c['zero_stage']} recompute={c['recompute']} "
            f"sp={c['sequence_parallel']} micro_batch={c['micro_batch']} m={self.num_microbatches}",
            f"stages  layers {c['stage_layers']}" if c["pp"] > 1 else "stages  one",
            f"speed   {self.step_time:.2f} s/step, {self.tflops_per_gpu:.0f} TFLOP/s per GPU, "
            f"MFU {self.mfu:.1%}, {self.tokens_per_second:,.0f} tokens/s",
            f"memory  {self.memory_per_gpu / G:.1f} of {self.gpu.memory / G:.0f} GB "
            f"({'fits' if self.fits else 'DOES NOT FIT'}): "
            + ", ".join(f"{k} {v / G:.1f}" for k, v in self.memory.items()),
            "time    "
            + ", ".join(f"{k} {v:.2f} s" for k, v in self.time.items())
            + f"; bubble = {self.bubble_fraction:.1%} of the pipeline's time",
        ]
        for axis, x in self.comm.items():
            if x["count"]:
                lines.append(
                    f"comm {axis:<3} {x['wire'] / G:9.2f} GB/GPU/step on the wire, {x['count']:7.0f} ops, "
                    f"{x['seconds']:.2f} s exposed; {x['link']}"
                )
        return "\n".join(lines + [f"note    {n}" for n in self.notes])


def memory_breakdown(
    layers,
    hidden,
    heads,
    vocab,
    seq,
    micro_batch,
    num_microbatches,
    tp=1,
    pp=1,
    dp=1,
    cp=1,
    v=1,
    zero_stage=1,
    recompute="selective",
    sequence_parallel=True,
    schedule="1f1b",
    *,
    ep=1,
    stage_layers=None,
    flash_attention=None,
    **arch,
) -> dict:
    """Bytes per GPU on the busiest stage: params, grads, optimizer (ZeRO 2020) and activations
    (Korthikanti 2022, generalized in `arch.py`). `arch`: the ModelShape keywords."""
    flash = ASSUMPTIONS.flash_attention if flash_attention is None else flash_attention
    return stage_memory(
        ModelShape(layers, hidden, heads, vocab, seq, num_microbatches, **arch),
        micro_batch,
        num_microbatches,
        tp,
        pp,
        dp,
        cp,
        v,
        zero_stage,
        recompute,
        bool(sequence_parallel and tp > 1),
        SCHEDULE_ALIASES.get(schedule, schedule or "1f1b"),
        ep,
        stage_layers,
        flash,
    )[0]


# ----------------------------------------------------------------------------- pieces
def _wave(M: float, N: float, tile, sms: int) -> float:
    """Fraction of the GPU's SM-time a GEMM's output tiles keep busy (the last wave is partial)."""
    tiles = math.ceil(M / tile[0]) * math.ceil(max(N, 1) / tile[1])
    return tiles / (math.ceil(tiles / sms) * sms)


# ----------------------------------------------------------------------------- the estimate
def offload_step_time(where: str, params: float, A: Assumptions) -> float:
    """The optimizer step with its states off the GPU (ZeRO-Offload, Ren et al. 2021; ZeRO-Infinity,
    Rajbhandari et al. 2021, Sec. 4.1), for the `params` this GPU updates: the 16-bit gradients
    go to the host and the new 16-bit parameters come back over PCIe (2 + 2 bytes each), a CPU Adam
    streams the fp32 states through host memory (`optimizer_bytes` each), and with "nvme" every
    state is also read from and written back to the drives: fp32 master, gradient and two moments,
    16 bytes each way (`minipar.offload.NVME_BYTES_PER_PARAM`, measured by tests/test_nvme.py)."""
    pcie, dram, nvme = (get_link(k) for k in ("pcie5", "host-dram", "nvme"))
    t = 4 * params / (pcie.bandwidth * pcie.efficiency) + A.optimizer_bytes * params / dram.bandwidth
    if where == "nvme":
        t += 2 * 16 * params / (nvme.bandwidth * nvme.efficiency)
    return t


def estimate(
    layers,
    hidden,
    heads,
    vocab,
    seq,
    global_batch,
    micro_batch,
    gpus,
    gpu="a100",
    tp=1,
    pp=1,
    dp=None,
    cp=1,
    v=1,
    zero_stage=1,
    recompute="selective",
    sequence_parallel=True,
    *,
    schedule=None,
    overlap_dp=False,
    cp_kind="ring",
    inter_node=None,
    assumptions: Assumptions | None = None,
    use_simulator: bool = True,
    stage_layers=None,
    ep=1,
    overlap_tp=False,
    overlap_pp=True,
    topology=None,
    kv_heads=None,
    ffn_hidden=None,
    gated_mlp=False,
    tied_embeddings=True,
    position_embeddings=True,
    dropout=True,
    head_dim=None,
    attention_params=None,
    experts=0,
    top_k=1,
    shared_experts=0,
    expert_ffn_hidden=None,
    first_dense_layers=0,
    flash_attention=None,
    offload="none",
) -> Estimate:
    """Predict step time, TFLOP/s per GPU, MFU and memory per GPU of one layout (module docstring).

    The first arguments describe a GPT (Narayanan 2021); the keywords after `stage_layers` make it a
    Llama (kv_heads, ffn_hidden, gated_mlp, tied_embeddings=False, position_embeddings=False,
    dropout=False) or an MoE (experts, top_k, shared_experts, expert_ffn_hidden,
    first_dense_layers, with ep-way expert parallelism carved out of dp x cp, as Megatron-Core does)."""
    A = assumptions or ASSUMPTIONS
    dp, schedule, m, g, topo = check_layout(**{k: x for k, x in locals().items() if k != "A"})
    if offload not in ("none", "cpu", "nvme"):
        raise ConfigError([f"offload={offload!r} is not one of: none, cpu, nvme"])
    if inter_node is not None:  # the older way to name the NIC: replace the topology's
        topo = Topology(
            topo.name + "+" + str(inter_node),
            topo.gpus_per_node,
            topo.domain,
            topo.nvlink,
            str(inter_node),
            topo.nics_per_node,
            topo.sharp,
            topo.source,
        )
    M = ModelShape(
        layers,
        hidden,
        heads,
        vocab,
        seq,
        global_batch,
        "",
        kv_heads,
        ffn_hidden,
        gated_mlp,
        tied_embeddings,
        position_embeddings,
        dropout,
        head_dim,
        attention_params,
        experts,
        top_k,
        shared_experts,
        expert_ffn_hidden,
        first_dense_layers,
    )
    sp = bool(sequence_parallel and tp > 1)
    # `flash_attention` describes the run (Megatron 2021 predates it); None: the Assumptions' default
    flash = A.flash_attention if flash_attention is None else bool(flash_attention)
    mem, counts, per_rank = stage_memory(
        M, micro_batch, m, tp, pp, dp, cp, v, zero_stage, recompute, sp, schedule, ep, stage_layers, flash
    )

    # --- per layer, per micro-batch, on one GPU -------------------------------------------
    peak, sms, keff = g.peak_flops, g.sm_count, A.kernel_efficiency
    tok = seq // cp * micro_batch  # tokens each GPU of a tp group computes
    h, act = hidden, seq // cp * micro_batch * hidden * 2

    def gemm(n_out, k_in, rows=tok, weights=1):  # forward seconds of (rows x k_in) @ (k_in x n_out)
        """Compute-bound at MAMF x wave quantization, unless moving its operands through HBM takes
        longer (the roofline; small or skinny GEMMs, one weight matrix per local expert)."""
        flops = (
            2 * rows * n_out * k_in / (peak * keff * g.matmul_efficiency * _wave(rows, n_out, A.tile, sms))
        )
        return max(flops, 2 * (rows * k_in + weights * k_in * n_out + rows * n_out) / g.memory_bandwidth)

    def coll(op, nbytes, size, stride):
        return collective_time(op, nbytes, size, stride, topo)

    attn_gemm = (
        gemm(M.attention_params / h / tp, h)
        if attention_params
        else gemm((M.q_dim + 2 * M.kv_dim) / tp, h) + gemm(h, M.q_dim / tp)
    )
    core = 4 * tok * seq * M.q_dim / tp  # QKᵀ and softmax·V, full square
    if flash:
        core_f = core / 2 / (peak * keff * g.attention_efficiency)  # causal: half the blocks run
        core_b = 2.5 * core_f
    else:
        core_f = core / (peak * keff * g.matmul_efficiency)
        core_b = 2 * core_f
    t_tp1 = coll("all_gather" if sp else "all_reduce", act, tp, 1)[0] + (
        coll("reduce_scatter", act, tp, 1)[0] if sp else 0.0
    )
    tp_how = coll("all_reduce", act, tp, 1)[1]
    fe = expert_ffn_hidden or M.ffn
    a2a_bytes = tok * top_k * h * 2 / (tp if sp else 1)
    t_a2a, a2a_how = coll("all_to_all", a2a_bytes, ep, tp * cp)
    hop_bytes = 2 * tok * M.kv_dim * 2 / tp  # K and V blocks of one ring-attention step
    t_hop, cp_how = coll("all_gather", hop_bytes * cp, cp, tp) if cp > 1 else (0.0, "none")
    t_hop /= max(1, cp - 1)

    def layer(moe):
        """(compute f, b; exposed TP f, b; exposed CP f, b; all-to-all f, b) of one layer, per micro-batch."""
        if moe:
            rows_e, local = tok * top_k, experts // ep  # routed copies; one weight matrix per local expert
            mlp = (
                gemm(fe * (2 if gated_mlp else 1) / tp, h, rows_e, local)
                + gemm(h, fe / tp, rows_e, local)
                + (
                    gemm(fe * (2 if gated_mlp else 1) * shared_experts / tp, h)
                    + gemm(h, fe * shared_experts / tp)
                    if shared_experts
                    else 0.0
                )
                + gemm(experts, h)
            )
        else:
            mlp = gemm(M.ffn * (2 if gated_mlp else 1) / tp, h) + gemm(h, M.ffn / tp)
        mm = attn_gemm + mlp
        written = M.layer_activation_bytes(
            seq, micro_batch, moe, tp, sp, None, flash, cp
        )  # every tensor produced
        if moe:  # permute each token's top-k copies before dispatch and un-permute them after combine
            written += 2 * (1 + top_k) * tok * h * 2 / (tp if sp else 1)
        ew = A.traffic_factor * written / g.memory_bandwidth
        cf, cb = mm + core_f + ew, 2 * mm + core_b + 2 * ew
        tp_f = 2 * t_tp1 if tp > 1 else 0.0
        tp_b = tp_f
        if overlap_tp:
            tp_f, tp_b = max(0.0, tp_f - mm), max(0.0, tp_b - 2 * mm)
        cp_f = max(0.0, (cp - 1) * t_hop - core_f) if cp > 1 else 0.0
        cp_b = max(0.0, 2 * (cp - 1) * t_hop - core_b) if cp > 1 else 0.0
        ep_f = 2 * t_a2a if moe and ep > 1 else 0.0
        if recompute == "full":
            cb += cf
            tp_b += tp_f
        elif recompute == "selective" and not flash:
            cb += core_f
        return cf, cb, tp_f, tp_b, cp_f, cp_b, ep_f, ep_f

    kinds, stages, i = M.layer_kinds(), [], 0
    lay = {k: layer(k) for k in set(kinds)}
    head_f = gemm(vocab / tp, h) + 3 * 4 * tok * vocab / tp / g.memory_bandwidth  # logits GEMM + fp32 loss
    for s, n in enumerate(counts):
        parts = [lay[k] for k in kinds[i : i + n]]
        i += n
        cf, cb, xf, xb, cpf, cpb, af, ab = (sum(p[j] for p in parts) for j in range(8))
        if s == len(counts) - 1:
            cf, cb = cf + head_f, cb + 2 * head_f
        stages.append(
            dict(
                layers=n,
                compute_f=cf,
                compute_b=cb,
                comm_f=xf + cpf + af,
                comm_b=xb + cpb + ab,
                cp=cpf + cpb,
                a2a=af + ab,
                t_f=cf + xf + cpf + af,
                t_b=cb + xb + cpb + ab,
            )
        )
    t_f, t_b = [x["t_f"] for x in stages], [x["t_b"] for x in stages]

    # pipeline sends: s·b·h (/t with SP) to the next stage, over the pp axis's link
    p2p_bytes = act / (tp if sp else 1)
    k_in, _ = placement(pp, tp * cp * dp, topo)
    link = topo.intra if k_in > 1 else topo.inter
    t_p2p = link.latency + p2p_bytes / (link.bandwidth * link.efficiency) if pp > 1 else 0.0
    hidden_p2p = overlap_pp and schedule == "interleaved_1f1b"
    fb = 1.0
    if schedule in (
        "dualpipe",
        "dualpipev",
    ):  # an F&B pair overlaps one half's communication with the other's compute
        x = max(stages, key=lambda x: x["t_f"] + x["t_b"])
        pair = max(x["compute_f"] + x["compute_b"], x["comm_f"] + x["comm_b"], x["t_f"], x["t_b"])
        fb = min(1.0, pair / (x["t_f"] + x["t_b"]))
    makespan, _ = pipeline_makespan(
        schedule, pp, m, v, t_f, t_b, 0.0 if hidden_p2p else t_p2p, use_simulator, fb
    )
    busiest = max(range(pp), key=lambda r: _rank_work(schedule, pp, [x["t_f"] + x["t_b"] for x in stages])[r])
    compute = m * _rank_work(schedule, pp, [x["compute_f"] + x["compute_b"] for x in stages])[busiest]
    # what communication adds to the busiest rank (DualPipe's pairs hide part of it: fb < 1)
    exposed_comm = max(
        0.0, fb * m * _rank_work(schedule, pp, [x["t_f"] + x["t_b"] for x in stages])[busiest] - compute
    )

    # --- data parallel: the busiest rank's gradients and (ZeRO) parameters ----------------
    x0 = max(per_rank.values(), key=lambda x: x["psi"])
    dense, expert = 2 * x0["dense"], 2 * x0["expert"]  # bf16 bytes on this GPU
    kd, ke = dp * cp, max(1, dp * cp // ep)

    def dp_time(op, nbytes_d, nbytes_e):
        return coll(op, nbytes_d, kd, tp)[0] + coll(op, nbytes_e, ke, tp * cp * ep)[0]

    rs, ag, ar = (dp_time(o, dense, expert) for o in ("reduce_scatter", "all_gather", "all_reduce"))
    r0 = stages[0]
    if zero_stage == 3:
        per_mb = 2 * ag + rs
        t_dp = m * per_mb
        exposed_dp = (
            m * max(0.0, per_mb - (r0["t_f"] + r0["t_b"])) + ag / max(1, r0["layers"]) if overlap_dp else t_dp
        )
    elif zero_stage == 2:
        t_dp = m * rs + ag
        exposed_dp = (
            max(0.0, rs - r0["t_b"]) + max(0.0, ag - r0["t_f"]) + (rs + ag) / max(1, r0["layers"])
            if overlap_dp
            else t_dp
        )
    else:
        t_dp = ar if zero_stage == 0 else rs + ag
        red, gat = (ar, 0.0) if zero_stage == 0 else (rs, ag)
        exposed_dp = (
            max(0.0, red - r0["t_b"]) + max(0.0, gat - r0["t_f"]) + t_dp / max(1, r0["layers"])
            if overlap_dp
            else t_dp
        )
    dp_how = coll("all_reduce", dense, kd, tp)[1]
    opt_params = x0["dense"] / (kd if zero_stage >= 1 else 1) + x0["expert"] / (ke if zero_stage >= 1 else 1)
    t_opt = A.optimizer_bytes * opt_params / g.memory_bandwidth
    if offload != "none":
        t_opt = offload_step_time(offload, opt_params, A)
        mem = {**mem, "optimizer": 0.0}  # the states live on the host or its NVMe drives
    step_time = makespan + exposed_dp + t_opt

    total, usable = sum(mem.values()), g.memory * (1 - A.memory_reserve)
    psi_first = x0["psi"]
    vol = comm_bytes(
        layers,
        hidden,
        seq,
        micro_batch,
        m,
        psi_first,
        tp,
        pp,
        dp,
        cp,
        v,
        zero_stage,
        recompute,
        sp,
        cp_kind,
        ep,
        M.moe_layers,
        top_k,
    )
    bubble = max(0.0, 1 - (compute + exposed_comm) / makespan) if pp > 1 else 0.0
    on_busiest = [x for j, x in enumerate(stages) if j % pp == busiest]
    a2a, t_cp = (m * fb * sum(x[k] for x in on_busiest) for k in ("a2a", "cp"))
    seconds = {
        "tp": max(0.0, exposed_comm - a2a - t_cp),
        "cp": t_cp,
        "ep": a2a,
        "dp": exposed_dp,
        "pp": 0.0 if hidden_p2p else 2 * (pp - 1) * t_p2p,
    }
    how = {"tp": tp_how, "cp": cp_how, "pp": link.name, "dp": dp_how, "ep": a2a_how}
    for axis, x in vol.items():
        x["link"], x["seconds"] = how[axis], seconds[axis]
    notes = (
        []
        if total <= usable
        else [
            f"needs {total / 1e9:.1f} GB > {usable / 1e9:.0f} GB usable: raise tp/pp, the ZeRO stage or recompute, "
            "or lower micro_batch"
        ]
    )
    hw = M.model_flops(global_batch)
    layer_fwd = (M._per_kind(M.layer_matmul_flops) + M.layers * M.attention_core_flops()) * global_batch * seq
    hw += (
        layer_fwd
        if recompute == "full"
        else (
            M.attention_core_flops() * M.layers * global_batch * seq
            if recompute == "selective" and not flash
            else 0.0
        )
    )
    return Estimate(
        config=dict(
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
            dp=dp,
            cp=cp,
            v=v,
            ep=ep,
            zero_stage=zero_stage,
            recompute=recompute,
            sequence_parallel=sp,
            schedule=schedule,
            stage_layers=counts,
            topology=topo.name,
            overlap_tp=overlap_tp,
            overlap_dp=overlap_dp,
            overlap_pp=overlap_pp,
            offload=offload,
            params=M.params,
            active_params=M.active_params,
            **M.arch_kwargs(),
        ),
        gpu=g,
        num_microbatches=m,
        step_time=step_time,
        tflops_per_gpu=hw / step_time / gpus / 1e12,
        mfu=M.model_flops(global_batch) / (step_time * gpus * peak),
        memory_per_gpu=total,
        memory=mem,
        fits=total <= usable,
        time={
            "compute": compute,
            "tp+cp": exposed_comm,
            "bubble": max(0.0, makespan - compute - exposed_comm),
            "dp": exposed_dp,
            "optimizer": t_opt,
        },
        comm=vol,
        bubble_fraction=bubble,
        tokens_per_second=global_batch * seq / step_time,
        notes=notes,
        stages=stages,
    )
