"""The auto-planner: search layouts, keep those that fit, rank them by predicted speed.

`plan(model, gpus, gpu)` enumerates tensor (t), pipeline (p), context (c) and data (d)
parallel sizes with t·p·c·d = gpus, the pipeline schedule and its virtual stages v,
the micro-batch size b, the ZeRO stage and the recompute policy. Each candidate's
memory is checked first (cheap); those that fit are timed by `estimate` with the
pipeline closed forms (which `minipar.pp.simulate` reproduces exactly without
communication), and the shortlist is re-timed with the simulator itself. The winner
comes with its explanation: memory breakdown, communication per axis, bubble.

Search rules that encode practice, not the model: t stays inside a node (its
collectives are on the critical path every layer) and divides the heads; sequence
parallelism is always on when t > 1 (it only removes memory and work, Korthikanti
2022); c is tried only for sequences of 8k tokens or more.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .estimate import ASSUMPTIONS, Assumptions, Estimate, estimate, memory_breakdown
from .formulas import num_params
from .hardware import get_gpu, get_link, lookup

__all__ = ["MODELS", "ModelShape", "plan", "Plan", "get_model"]


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    global_batch: int
    source: str = ""

    @property
    def params(self) -> float:
        return num_params(self.layers, self.hidden, self.vocab, self.seq)


# GPT-shaped models (the 12lh² formula); Llama-like sizes use their layers/hidden/heads,
# so SwiGLU and grouped-query attention make the real models a few % larger.
MODELS = {
    "1.7b": ModelShape(24, 2304, 24, 51200, 2048, 512, "Narayanan 2021 Table 1"),
    "7.5b": ModelShape(36, 4096, 32, 51200, 2048, 512, "Narayanan 2021 Table 1"),
    "7b": ModelShape(32, 4096, 32, 32000, 4096, 1024, "Llama 2 7B shape (Touvron 2023), 4M-token batch"),
    "13b": ModelShape(40, 5120, 40, 32000, 4096, 1024, "Llama 2 13B shape, 4M-token batch"),
    "39b": ModelShape(48, 8192, 64, 51200, 2048, 1536, "Narayanan 2021 Table 1"),
    "70b": ModelShape(80, 8192, 64, 32000, 4096, 1024, "Llama 2 70B shape, 4M-token batch"),
    "175b": ModelShape(96, 12288, 96, 51200, 2048, 1536, "GPT-3 175B (Brown 2020), 3.2M-token batch"),
    "405b": ModelShape(126, 16384, 128, 128256, 8192, 2048, "Llama 3 405B shape (Dubey 2024), 16M tokens"),
    "530b": ModelShape(105, 20480, 128, 51200, 2048, 2520, "Narayanan 2021 Table 1 / MT-NLG"),
    "1t": ModelShape(128, 25600, 160, 51200, 2048, 3072, "Narayanan 2021 Table 1"),
}


def get_model(model) -> ModelShape:
    return lookup(MODELS, model, ModelShape, "model", "pass a ModelShape(layers, hidden, heads, vocab, seq, global_batch)")


@dataclass
class Plan:
    model: ModelShape
    gpus: int
    gpu: str
    ranked: list            # the shortlist, re-timed with the pipeline simulator, fastest first
    considered: int         # layouts enumerated
    too_big: int            # of those, how many did not fit in memory
    more: list = field(default_factory=list)   # the other layouts that fit (closed-form pipeline timing)
    notes: list = field(default_factory=list)

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    def table(self, n: int = 5) -> str:
        rows = [f"{'#':>2} {'tp':>3} {'pp':>3} {'v':>2} {'dp':>4} {'cp':>3} {'b':>2} {'ZeRO':>4} "
                f"{'recompute':>9} {'schedule':>11} {'GB/GPU':>7} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'bubble':>7}"]
        for i, e in enumerate(self.ranked[:n], 1):
            c = e.config
            rows.append(f"{i:>2} {c['tp']:>3} {c['pp']:>3} {c['v']:>2} {c['dp']:>4} {c['cp']:>3} "
                        f"{c['micro_batch']:>2} {c['zero_stage']:>4} {str(c['recompute']):>9} {c['schedule']:>11} "
                        f"{e.memory_per_gpu / 1e9:7.1f} {e.step_time:8.2f} {e.tflops_per_gpu:8.0f} "
                        f"{e.mfu:6.1%} {e.bubble_fraction:7.1%}")
        return "\n".join(rows)

    def explain(self) -> str:
        e, M = self.best, self.model
        head = (f"{M.params / 1e9:.1f}B-parameter model (l={M.layers}, h={M.hidden}, a={M.heads}, s={M.seq}, "
                f"B={M.global_batch}) on {self.gpus} x {self.gpu}: {self.considered} layouts tried, "
                f"{self.too_big} do not fit; the best {len(self.ranked)} of {len(self.ranked) + len(self.more)} "
                "re-timed with the pipeline simulator.")
        why = []
        if len(self.ranked) > 1:
            r = self.ranked[1]
            why.append(f"runner-up is {r.step_time / e.step_time - 1:.1%} slower: tp={r.config['tp']} "
                       f"pp={r.config['pp']} v={r.config['v']} {r.config['schedule']} b={r.config['micro_batch']} "
                       f"ZeRO-{r.config['zero_stage']} recompute={r.config['recompute']}")
        return "\n".join([head, e.explain(), *why, *self.notes])

    def __str__(self) -> str:
        return self.explain() + "\n\n" + self.table()


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def plan(model="70b", gpus: int = 64, gpu="h100", *, global_batch: int | None = None, seq: int | None = None,
         micro_batches=(1, 2, 4), zero_stages=(1, 2, 3), recomputes=(None, "selective", "full"),
         schedules=("1f1b", "interleaved", "zb-h1"), max_v: int = 8, overlap_dp: bool = False,
         gpus_per_node: int | None = None, inter_node=None, shortlist: int = 10,
         assumptions: Assumptions | None = None) -> Plan:
    """Rank the layouts of `model` on `gpus` GPUs of type `gpu` that fit in memory.

    The cluster's shape: `gpus_per_node` (default the GPU's, 8) and the `inter_node` link
    name (default the GPU's NIC, e.g. "ib-ndr"; "roce-400", "ib-hdr", ... or your own)."""
    M, g, A = get_model(model), get_gpu(gpu), assumptions or ASSUMPTIONS
    if gpus_per_node is not None or inter_node is not None:
        if gpus_per_node is not None and (not isinstance(gpus_per_node, int) or gpus_per_node < 1):
            raise ValueError(f"gpus_per_node must be a positive integer, got {gpus_per_node!r}")
        g = replace(g, gpus_per_node=gpus_per_node or g.gpus_per_node,
                    inter_node=get_link(inter_node).name if inter_node else g.inter_node)
    M = replace(M, **{k: x for k, x in dict(global_batch=global_batch, seq=seq).items() if x is not None})
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    usable = g.memory * (1 - A.memory_reserve)
    considered, too_big, fits, smallest = 0, 0, [], None
    for tp in [t for t in _divisors(g.gpus_per_node) if M.heads % t == 0 and gpus % t == 0]:
        for pp in [p for p in _divisors(M.layers) if gpus % (tp * p) == 0]:
            for cp in [c for c in (1, 2, 4, 8) if gpus % (tp * pp * c) == 0 and M.seq % c == 0
                       and (c == 1 or M.seq >= 8192)]:
                dp = gpus // (tp * pp * cp)
                for b in [b for b in micro_batches if M.global_batch % (dp * b) == 0]:
                    m = M.global_batch // (dp * b)
                    for schedule, v in _schedules(schedules, pp, m, M.layers, max_v):
                        # with nothing to shard over (d·c = 1) every ZeRO stage is the same layout
                        for zero in (zero_stages if dp * cp > 1 else zero_stages[:1]):
                            for rc in recomputes:
                                considered += 1
                                mem = sum(memory_breakdown(M.layers, M.hidden, M.heads, M.vocab, M.seq, b, m, tp,
                                                           pp, dp, cp, v, zero, rc, tp > 1, schedule).values())
                                if mem > usable:
                                    too_big += 1
                                    if smallest is None or mem < smallest[0]:
                                        smallest = (mem, f"tp={tp} pp={pp} cp={cp} b={b} ZeRO-{zero} recompute={rc}")
                                    continue
                                fits.append(dict(tp=tp, pp=pp, dp=dp, cp=cp, v=v, micro_batch=b, zero_stage=zero,
                                                 recompute=rc, schedule=schedule))
    if considered == 0:
        raise ValueError(f"no layout splits global_batch={M.global_batch} over {gpus} GPUs: the data-parallel "
                         f"size must divide the global batch; pick a GPU count or batch with common factors")
    if not fits:
        raise ValueError(f"no layout of the {M.params / 1e9:.1f}B model fits on {gpus} x {g.name} "
                         f"({g.memory / 1e9:.0f} GB, {usable / 1e9:.0f} GB usable): the smallest needs "
                         f"{smallest[0] / 1e9:.1f} GB per GPU ({smallest[1]}). Use more GPUs or a GPU with more memory.")

    def run(cfg, sim):
        return estimate(M.layers, M.hidden, M.heads, M.vocab, M.seq, M.global_batch, cfg["micro_batch"], gpus, g,
                        cfg["tp"], cfg["pp"], cfg["dp"], cfg["cp"], cfg["v"], cfg["zero_stage"], cfg["recompute"],
                        True, schedule=cfg["schedule"], overlap_dp=overlap_dp, assumptions=A, use_simulator=sim)

    quick = sorted((run(c, False) for c in fits), key=lambda e: e.step_time)
    ranked = sorted((run(e.config, True) for e in quick[:shortlist]), key=lambda e: e.step_time)
    return Plan(M, gpus, g.name, ranked, considered, too_big, quick[shortlist:])


def _schedules(names, pp: int, m: int, layers: int, max_v: int):
    if pp == 1:
        yield "1f1b", 1
        return
    for name in names:
        if name == "interleaved":
            for v in range(2, max_v + 1):
                if (layers // pp) % v == 0 and m % pp == 0:
                    yield name, v
        else:
            yield name, 1
