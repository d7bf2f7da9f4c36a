"""Serving on GPUs, modeled: decode and prefill on a roofline, TP against PP, and a layout picker.

    python -m minipar.plan.serving --model 70b --gpus 8 --gpu h100 --latency-ms 30

The model (a roofline: every kernel at the hardware's peak HBM bandwidth or FLOP/s, every message
at the link's peak after its latency; stated as our assumption: real systems are slower by their
efficiencies). Hardware numbers are `minipar.plan.hardware`'s datasheet table.
For a layout of tp t, pp p (and dp replicas), bf16 weights and cache (2 bytes):

* Decode is memory-bound. One step of a micro-batch of b sequences, each with c tokens in its
  cache, on one stage (L/p layers) reads that GPU's weights and those sequences' K and V:
      t_mem  = (2Ψ'/(t·p) + b·c·κ) / HBM,     κ = 2·(L/p)·⌈n_kv/t⌉·d·2   (K and V bytes per token
                                             per GPU; grouped-query heads replicate when t > n_kv)
      t_flop = (2Ψ'·b + 4·b·c·h·L) / (t·p) / peak       (weights' GEMVs + attention's QKᵀ and PV)
  and takes max(t_mem, t_flop); Ψ' = Ψ - V·h are the weights that multiply (the embedding table is
  a lookup of b rows). Arithmetic intensity (FLOPs per byte) grows with b only while the weights
  dominate the bytes; the cache's bytes grow with b too, so long contexts keep decode
  memory-bound at any batch (Pope et al. 2022, "Efficiently Scaling Transformer
  Inference", Sec. 2-3; Kwon et al. 2023).
* TP adds, per layer, two all-reduces of b·h·2 bytes (after attention and after the MLP) on the
  node's NVLink (Shoeybi et al. 2019), each the faster of a ring, 2(t-1)·(α + b·h·2/t / BW), and a
  one-shot exchange, α + (t-1)·b·h·2 / BW (see `all_reduce_time`): one-shot at small batches.
* PP: the micro-batch visits the p stages in turn, p-1 hops of b·h·2 bytes (α + bytes/BW), and
  its tokens return to stage 0 (one hop of b·8 bytes). So a token costs
      ITL = p·t_stage + hops          (p = 1: t_stage; TP lowers t_stage, PP multiplies it)
  With N sequences in p micro-batches of N/p (vLLM's virtual engines) every stage is busy and
  each micro-batch gets one token per ITL: throughput = N / ITL(N/p) per replica.
* Prefill is compute-bound: s prompt tokens cost (2Ψ'·s + 2·s²·h·L)/(t·p)/peak per stage (causal
  attention: half of 4s²hL), plus tp's all-reduces of s·h·2 bytes and pp's hops; TTFT = all stages.
* Memory: 2Ψ/(t·p) + N_replica·c·κ must fit in (1 - reserve) of the GPU.

For Llama 2 70B on 8 H100s this says TP8 has the lowest per-token latency, PP8 the highest (it
reads the weights of every stage in turn), and at high concurrency PP8's throughput passes TP8's
once TP's all-reduces of b·h bytes grow (see `compare`, notebook 11).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from ..validation import ArgumentParser, Float, Int, Problems, exit_on_error
from .hardware import GPU, get_gpu, get_link

__all__ = [
    "ServingModel",
    "SERVING_MODELS",
    "Layout",
    "decode_step",
    "token_latency",
    "decode_throughput",
    "prefill_latency",
    "max_concurrency",
    "kv_bytes_per_token",
    "all_reduce_time",
    "step_cost",
    "hop_time",
    "candidate_layouts",
    "choose_layout",
    "ServingPlan",
    "compare",
    "main",
]

BYTES = 2  # bf16 weights, activations and cache
RESERVE = 0.10  # of GPU memory kept for the CUDA context, NCCL and activations


@dataclass(frozen=True)
class ServingModel:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int  # grouped-query attention (Ainslie et al. 2023): K/V heads shared by heads/kv_heads
    ffn: int  # MLP inner width
    vocab: int
    gated: bool = True  # SwiGLU: three h x ffn matrices (GPT's MLP: two)
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> float:
        """Ψ: per layer q, o (2h²), k, v (2·h·n_kv·d), the MLP; plus untied embedding and head (2Vh)."""
        h, L = self.hidden, self.layers
        per_layer = (
            2 * h * h + 2 * h * self.kv_heads * self.head_dim + (3 if self.gated else 2) * h * self.ffn
        )
        return L * per_layer + 2 * self.vocab * h

    @property
    def matmul_params(self) -> float:
        """Ψ' = Ψ - V·h: the weights a forward multiplies (all but the embedding table, a lookup)."""
        return self.params - self.vocab * self.hidden

    @classmethod
    def from_gpt(cls, cfg, name: str = "minipar GPT") -> "ServingModel":
        """A minipar `GPTConfig` (GELU MLP of mlp_ratio·h, one K/V head per head)."""
        return cls(
            name, cfg.layers, cfg.hidden, cfg.heads, cfg.heads, cfg.mlp_ratio * cfg.hidden, cfg.vocab, False
        )


SERVING_MODELS = {
    "8b": ServingModel("8b", 32, 4096, 32, 8, 14336, 128256, True, "Llama 3 8B (Dubey et al. 2024, Table 3)"),
    "70b": ServingModel(
        "70b", 80, 8192, 64, 8, 28672, 32000, True, "Llama 2 70B (Touvron et al. 2023): GQA, 8 KV heads"
    ),
    "405b": ServingModel(
        "405b", 126, 16384, 128, 8, 53248, 128256, True, "Llama 3 405B (Dubey et al. 2024, Table 3)"
    ),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        axes = [f"{a.upper()}{getattr(self, a)}" for a in ("dp", "tp", "pp") if getattr(self, a) > 1]
        return "·".join(axes) or "1 GPU"


def _model(model) -> ServingModel:
    if isinstance(model, ServingModel):
        return model
    if str(model).lower() not in SERVING_MODELS:
        raise ValueError(
            f"unknown model {model!r}; choose one of {sorted(SERVING_MODELS)} or pass a ServingModel"
        )
    return SERVING_MODELS[str(model).lower()]


def kv_bytes_per_token(m: ServingModel, layout: Layout) -> float:
    """κ: bytes of K and V one GPU holds per cached token (its L/p layers, ⌈n_kv/t⌉ heads)."""
    return 2 * (m.layers / layout.pp) * math.ceil(m.kv_heads / layout.tp) * m.head_dim * BYTES


def all_reduce_time(nbytes: float, k: int, link) -> float:
    """The faster of two all-reduces of `nbytes` over k GPUs: a ring, 2(k-1) steps of
    latency + (nbytes/k)/bandwidth (Patarasuk & Yuan 2009; bandwidth-optimal, NCCL's choice for
    large messages), and a one-shot exchange, one step in which every GPU reads the other k-1
    buffers, latency + (k-1)·nbytes/bandwidth (latency-optimal: vLLM's custom all-reduce and
    NCCL's NVLS for the small messages of decoding)."""
    if k <= 1:
        return 0.0
    ring = 2 * (k - 1) * (link.latency + nbytes / k / link.bandwidth)
    one_shot = link.latency + (k - 1) * nbytes / link.bandwidth
    return min(ring, one_shot)


def _tp_link(gpu: GPU, layout: Layout):
    return get_link(gpu.intra_node if layout.tp <= gpu.gpus_per_node else gpu.inter_node)


def hop_time(m, layout: Layout, gpu, tokens: float) -> float:
    """A micro-batch's pipeline hops: p-1 sends of tokens·h·2 bytes (NVLink inside a node, the NICs
    between nodes), and the sampled tokens' return to stage 0 (8 bytes each)."""
    m, gpu, p = _model(m), get_gpu(gpu), layout.pp
    if p == 1:
        return 0.0
    nodes = math.ceil(layout.tp * p / gpu.gpus_per_node)  # a replica's stages span these nodes
    intra, inter = get_link(gpu.intra_node), get_link(gpu.inter_node)
    act = tokens * m.hidden * BYTES
    cross = min(nodes - 1, p - 1)  # hops between consecutive nodes
    back = inter if nodes > 1 else intra
    return (
        (p - 1 - cross) * (intra.latency + act / intra.bandwidth)
        + cross * (inter.latency + act / inter.bandwidth)
        + back.latency
        + tokens * 8 / back.bandwidth
    )


def decode_step(m, layout: Layout, gpu, batch: float, context: float) -> dict:
    """Seconds of one decode step of `batch` sequences (`context` cached tokens each) on one stage."""
    m, gpu = _model(m), get_gpu(gpu)
    t, p = layout.tp, layout.pp
    weights = 2 * m.matmul_params / (t * p)
    kv = batch * context * kv_bytes_per_token(m, layout)
    memory = (weights + kv) / gpu.memory_bandwidth
    flops = (2 * m.matmul_params * batch + 4 * batch * context * m.hidden * m.layers) / (t * p)
    compute = flops / gpu.peak_flops
    comm = 2 * (m.layers / p) * all_reduce_time(batch * m.hidden * BYTES, t, _tp_link(gpu, layout))
    return {
        "weights_bytes": weights,
        "kv_bytes": kv,
        "memory": memory,
        "flops": flops,
        "compute": compute,
        "tp_comm": comm,
        "total": max(memory, compute) + comm,
        "memory_bound": memory >= compute,
    }


def token_latency(m, layout: Layout, gpu="h100", batch: float = 1, context: float = 1024) -> float:
    """Inter-token latency of a micro-batch of `batch` sequences: p stage steps and the hops."""
    return layout.pp * decode_step(m, layout, gpu, batch, context)["total"] + hop_time(m, layout, gpu, batch)


def decode_throughput(m, layout: Layout, gpu="h100", concurrency: float = 1, context: float = 1024) -> tuple:
    """(tokens/s, ITL) with `concurrency` sequences over the dp replicas, p micro-batches each."""
    b = concurrency / (layout.dp * layout.pp)
    itl = token_latency(m, layout, gpu, b, context)
    return concurrency / itl, itl


def prefill_latency(m, layout: Layout, gpu="h100", prompt: int = 1024, batch: int = 1) -> float:
    """TTFT of `batch` prompts of `prompt` tokens: compute-bound stages, tp all-reduces, pp hops."""
    m, gpu = _model(m), get_gpu(gpu)
    t, p, s = layout.tp, layout.pp, batch * prompt
    flops = (2 * m.matmul_params * s + 2 * batch * prompt**2 * m.hidden * m.layers) / (t * p)
    memory = (2 * m.matmul_params / (t * p) + s * kv_bytes_per_token(m, layout)) / gpu.memory_bandwidth
    comm = 2 * (m.layers / p) * all_reduce_time(s * m.hidden * BYTES, t, _tp_link(gpu, layout))
    return p * (max(flops / gpu.peak_flops, memory) + comm) + hop_time(m, layout, gpu, s)


def max_concurrency(m, layout: Layout, gpu="h100", context: float = 1024) -> int:
    """Sequences of `context` tokens whose cache fits beside the weights, over all replicas."""
    m, gpu = _model(m), get_gpu(gpu)
    free = (1 - RESERVE) * gpu.memory - 2 * m.params / (layout.tp * layout.pp)
    return max(0, int(free // (context * kv_bytes_per_token(m, layout)))) * layout.dp


def step_cost(m, layout: Layout, gpu="h100"):
    """seconds(step) of one scheduler `Step` on one stage, hops included: the cost `serve.simulate`
    advances its modeled clock by. Prefills are compute-bound, decodes read their cache."""
    m, gpu = _model(m), get_gpu(gpu)
    t, p = layout.tp, layout.pp
    kappa = kv_bytes_per_token(m, layout)

    def cost(step) -> float:
        tokens = sum(w.tokens for w in step.works)
        ctx = sum(w.start + w.tokens for w in step.works if not w.prefill)
        attn = sum(2 * w.tokens**2 if w.prefill else 4 * (w.start + 1) for w in step.works)
        flops = (2 * m.matmul_params * tokens + attn * m.hidden * m.layers) / (t * p)
        memory = (2 * m.matmul_params / (t * p) + (ctx + tokens) * kappa) / gpu.memory_bandwidth
        comm = 2 * (m.layers / p) * all_reduce_time(tokens * m.hidden * BYTES, t, _tp_link(gpu, layout))
        return max(memory, flops / gpu.peak_flops) + comm + hop_time(m, layout, gpu, len(step.works))

    return cost


def candidate_layouts(m, gpus: int, gpu="h100") -> list[Layout]:
    """Every tp x pp x dp = gpus with tp dividing the heads and pp the layers, tp inside a node."""
    m, gpu = _model(m), get_gpu(gpu)
    out = []
    for tp in range(1, gpus + 1):
        for pp in range(1, gpus // tp + 1):
            if gpus % (tp * pp) == 0 and m.heads % tp == 0 and m.layers % pp == 0 and tp <= gpu.gpus_per_node:
                out.append(Layout(tp, pp, gpus // (tp * pp)))
    return out


@dataclass
class ServingPlan:
    model: ServingModel
    gpus: int
    gpu: str
    target: float  # seconds per token
    context: int
    rows: list = field(default_factory=list)  # dicts, best first
    notes: list = field(default_factory=list)

    @property
    def best(self) -> dict:
        return self.rows[0]

    def table(self, n: int = 8) -> str:
        out = [
            f"{'layout':<12}{'ITL b=1 ms':>11}{'max conc.':>10}{'conc. at target':>16}{'ITL ms':>8}{'tokens/s':>10}"
        ]
        for r in self.rows[:n]:
            out.append(
                f"{str(r['layout']):<12}{r['itl1'] * 1e3:>11.2f}{r['capacity']:>10}{r['concurrency']:>16}"
                f"{r['itl'] * 1e3:>8.2f}{r['throughput']:>10,.0f}"
            )
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def choose_layout(m, gpus: int, gpu="h100", latency_target: float = 0.05, context: int = 2048) -> ServingPlan:
    """The layout with the most tokens/s whose inter-token latency stays within `latency_target`,
    at the highest concurrency that keeps it there and fits in memory."""
    m, g = _model(m), get_gpu(gpu)
    rows = []
    for lay in candidate_layouts(m, gpus, g):
        cap = max_concurrency(m, lay, g, context)
        itl1 = token_latency(m, lay, g, 1, context)
        if cap < 1 or itl1 > latency_target:
            rows.append(dict(layout=lay, itl1=itl1, capacity=cap, concurrency=0, itl=itl1, throughput=0.0))
            continue
        lo, hi = 1, cap  # the largest concurrency within the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (
                (mid, hi)
                if decode_throughput(m, lay, g, mid, context)[1] <= latency_target
                else (lo, mid - 1)
            )
        tput, itl = decode_throughput(m, lay, g, lo, context)
        rows.append(dict(layout=lay, itl1=itl1, capacity=cap, concurrency=lo, itl=itl, throughput=tput))
    rows.sort(key=lambda r: (-r["throughput"], r["itl1"]))
    plan = ServingPlan(m, gpus, g.name, latency_target, context, rows)
    if not rows or rows[0]["throughput"] == 0:
        plan.notes.append(
            f"no layout meets {latency_target * 1e3:g} ms per token; the fastest is listed first"
        )
        plan.rows.sort(key=lambda r: r["itl1"])
    return plan


def compare(
    m="70b",
    layouts=(Layout(tp=8), Layout(pp=8), Layout(tp=4, pp=2)),
    gpu="h100",
    context: int = 2048,
    concurrency=(1, 8, 32, 128, 512),
) -> str:
    """Per-token latency and throughput against concurrency, one row per layout."""
    head = f"{'layout':<10}{'ITL b=1 ms':>11}" + "".join(f"{f'N={n} tok/s':>14}" for n in concurrency)
    rows = [head]
    for lay in layouts:
        cap = max_concurrency(m, lay, gpu, context)
        cells = [
            f"{decode_throughput(m, lay, gpu, n, context)[0]:>14,.0f}" if n <= cap else f"{'(no room)':>14}"
            for n in concurrency
        ]
        rows.append(f"{str(lay):<10}{token_latency(m, lay, gpu, 1, context) * 1e3:>11.2f}" + "".join(cells))
    return "\n".join(rows)


@exit_on_error
def main(argv=None) -> int:
    """python -m minipar.plan.serving: pick a serving layout for a model, GPUs and a latency target."""
    ap = ArgumentParser(prog="python -m minipar.plan.serving", description=main.__doc__)
    ap.add_argument("--model", default="70b", help=f"one of {', '.join(SERVING_MODELS)} [70b]")
    ap.add_argument("--gpus", type=Int, default=8, help="GPUs in all [8]")
    ap.add_argument("--gpu", default="h100", help="a GPU of minipar.plan.hardware [h100]")
    ap.add_argument("--latency-ms", type=Float, default=30.0, help="inter-token latency target, ms [30]")
    ap.add_argument("--context", type=Int, default=2048, help="tokens in each sequence's cache [2048]")
    a = ap.parse_args(argv)
    p = Problems(cli=True)
    p.choice("model", str(a.model).lower(), SERVING_MODELS)
    p.integer("gpus", a.gpus, low=1)
    p.number("latency_ms", a.latency_ms, low=0, low_open=True)
    p.integer("context", a.context, low=1)
    p.merge(get_gpu, a.gpu)
    p.raise_if_any("cannot plan this")
    plan = choose_layout(a.model, a.gpus, a.gpu, a.latency_ms / 1e3, a.context)
    m = plan.model
    print(
        f"{m.name}: {m.params / 1e9:.1f}B parameters ({m.source}); {a.gpus} x {a.gpu}, context {a.context}, "
        f"target {a.latency_ms:g} ms per token (roofline: peak HBM, FLOPs and links)\n"
    )
    print(plan.table())
    best = plan.best
    print(
        f"\npick {best['layout']}: {best['throughput']:,.0f} tokens/s at {best['concurrency']} concurrent sequences, "
        f"{best['itl'] * 1e3:.2f} ms per token ({best['itl1'] * 1e3:.2f} ms alone)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
