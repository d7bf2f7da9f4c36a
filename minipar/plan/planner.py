"""The auto-planner: search layouts, keep those that fit, rank them by predicted speed.

`plan(model, gpus, gpu)` enumerates tensor (t), pipeline (p), context (c), data (d) and
expert (e, MoE only, carved out of d·c) parallel sizes with t·p·c·d = gpus, the pipeline
schedule and its virtual stages v, the micro-batch size b, the ZeRO stage and the recompute
policy. p need not divide the layers: uneven stages come from `pp.balance_stages`. Each
candidate's memory is checked first (cheap); those that fit are timed by `estimate` with
the pipeline closed forms, and the shortlist is re-timed with the simulator itself. The
winner comes with its explanation: memory breakdown, communication per axis, bubble.

Search rules that encode practice, not the model: t stays inside an NVLink domain (its
collectives are on the critical path every layer) and divides the heads; sequence
parallelism is always on when t > 1 (it only removes memory and work, Korthikanti 2022);
c is tried only for long contexts, 16k tokens or more (Llama 3 turned it on only for its
long-context stage); a higher ZeRO stage or more recompute is tried only where the cheaper
one does not fit (it never runs faster); DualPipeV only for MoE models (its point is hiding
the all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .arch import MODELS, ModelShape, get_model
from .estimate import ASSUMPTIONS, Assumptions, Estimate, estimate
from .hardware import get_gpu, get_link
from .memory import stage_memory
from .topology import Topology, get_topology

__all__ = ["MODELS", "ModelShape", "plan", "Plan", "get_model"]


@dataclass
class Plan:
    model: ModelShape
    gpus: int
    gpu: str
    ranked: list  # the shortlist, re-timed with the pipeline simulator, fastest first
    considered: int  # layouts enumerated
    too_big: int  # of those, how many did not fit in memory
    more: list = field(default_factory=list)  # the other layouts that fit (closed-form pipeline timing)
    notes: list = field(default_factory=list)

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    def table(self, n: int = 5) -> str:
        rows = [
            f"{'#':>2} {'tp':>3} {'pp':>3} {'v':>2} {'dp':>4} {'cp':>3} {'ep':>3} {'b':>2} {'ZeRO':>4} "
            f"{'recompute':>9} {'schedule':>16} {'GB/GPU':>7} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'bubble':>7}"
        ]
        for i, e in enumerate(self.ranked[:n], 1):
            c = e.config
            rows.append(
                f"{i:>2} {c['tp']:>3} {c['pp']:>3} {c['v']:>2} {c['dp']:>4} {c['cp']:>3} {c['ep']:>3} "
                f"{c['micro_batch']:>2} {c['zero_stage']:>4} {str(c['recompute']):>9} {c['schedule']:>16} "
                f"{e.memory_per_gpu / 1e9:7.1f} {e.step_time:8.2f} {e.tflops_per_gpu:8.0f} "
                f"{e.mfu:6.1%} {e.bubble_fraction:7.1%}"
            )
        return "\n".join(rows)

    def explain(self) -> str:
        e, M = self.best, self.model
        moe = (
            f", {M.experts} experts top-{M.top_k} ({M.active_params / 1e9:.1f}B active)" if M.experts else ""
        )
        head = (
            f"{M.params / 1e9:.1f}B-parameter model (l={M.layers}, h={M.hidden}, a={M.heads}, s={M.seq}, "
            f"B={M.global_batch}{moe}) on {self.gpus} x {self.gpu} ({e.config['topology']}): "
            f"{self.considered} layouts tried, {self.too_big} do not fit; the best {len(self.ranked)} of "
            f"{len(self.ranked) + len(self.more)} re-timed with the pipeline simulator."
        )
        why = []
        if len(self.ranked) > 1:
            r = self.ranked[1]
            why.append(
                f"runner-up is {r.step_time / e.step_time - 1:.1%} slower: tp={r.config['tp']} "
                f"pp={r.config['pp']} v={r.config['v']} {r.config['schedule']} b={r.config['micro_batch']} "
                f"ZeRO-{r.config['zero_stage']} recompute={r.config['recompute']}"
            )
        t = e.time
        big = max(
            ("bubble", t["bubble"]),
            ("exposed tp/cp/ep communication", t["tp+cp"]),
            ("data-parallel", t["dp"]),
            key=lambda kv: kv[1],
        )
        why.append(
            f"why: compute is {t['compute'] / e.step_time:.0%} of the step; the largest loss is the "
            f"{big[0]} ({big[1] / e.step_time:.0%})"
        )
        return "\n".join([head, e.explain(), *why, *self.notes])

    def __str__(self) -> str:
        return self.explain() + "\n\n" + self.table()


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _cluster(g, topology, gpus_per_node, inter_node) -> Topology:
    topo = get_topology(topology or g.topology or "dgx-h100")
    if gpus_per_node is not None or inter_node is not None:
        if gpus_per_node is not None and (not isinstance(gpus_per_node, int) or gpus_per_node < 1):
            raise ValueError(f"gpus_per_node must be a positive integer, got {gpus_per_node!r}")
        n = gpus_per_node or topo.gpus_per_node
        topo = replace(
            topo,
            name=f"{topo.name}*",
            gpus_per_node=n,
            domain=n if gpus_per_node else topo.domain,
            nics_per_node=n if gpus_per_node else topo.nics_per_node,
            nic=get_link(inter_node).name if inter_node else topo.nic,
        )
    return topo


def plan(
    model="70b",
    gpus: int = 64,
    gpu="h100",
    *,
    global_batch: int | None = None,
    seq: int | None = None,
    micro_batches=(1, 2, 4),
    zero_stages=(1, 2, 3),
    recomputes=(None, "selective", "full"),
    schedules=("1f1b", "interleaved_1f1b", "zb_h1", "dualpipev"),
    max_v: int = 8,
    overlap_dp: bool = False,
    overlap_tp: bool = False,
    gpus_per_node: int | None = None,
    inter_node=None,
    topology=None,
    shortlist: int = 10,
    assumptions: Assumptions | None = None,
) -> Plan:
    """Rank the layouts of `model` on `gpus` GPUs of type `gpu` that fit in memory.

    The cluster: `topology` (default the GPU's, e.g. "dgx-h100"; "h100-roce", "gb200-nvl72", ...),
    or the older `gpus_per_node` and `inter_node` link name."""
    M, g, A = get_model(model), get_gpu(gpu), assumptions or ASSUMPTIONS
    topo = _cluster(g, topology, gpus_per_node, inter_node)
    M = replace(M, **{k: x for k, x in dict(global_batch=global_batch, seq=seq).items() if x is not None})
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    schedules = tuple({"interleaved": "interleaved_1f1b", "zb-h1": "zb_h1"}.get(s, s) for s in schedules)
    usable = g.memory * (1 - A.memory_reserve)
    if A.flash_attention and None in recomputes:  # flash attention already recomputes the scores: same layout
        recomputes = tuple(r for r in recomputes if r != "selective")
    kv = M.kv_heads or M.heads
    considered, too_big, fits, smallest = 0, 0, [], None
    for tp in [
        t
        for t in _divisors(topo.domain)
        if M.heads % t == 0 and gpus % t == 0 and (kv % t == 0 or t % kv == 0) and t <= 8
    ]:
        for pp in [p for p in _divisors(gpus // tp) if p <= min(M.layers, 64)]:
            for cp in [
                c
                for c in (1, 2, 4, 8, 16)
                if gpus % (tp * pp * c) == 0 and M.seq % c == 0 and (c == 1 or M.seq >= 16384)
            ]:
                dp = gpus // (tp * pp * cp)
                eps = [e for e in _divisors(dp * cp) if M.experts % e == 0 and e <= 64] if M.experts else [1]
                for ep in eps:
                    for b in [b for b in micro_batches if M.global_batch % (dp * b) == 0]:
                        m = M.global_batch // (dp * b)
                        for schedule, v in _schedules(schedules, pp, m, M, max_v):
                            # with nothing to shard over (d·c = 1) every ZeRO stage is the same layout; a higher
                            # stage or more recompute only pays off if the cheaper one does not fit
                            kept = set()
                            for zero in zero_stages if dp * cp > 1 else zero_stages[:1]:
                                for rc in recomputes:
                                    considered += 1
                                    if any(rc2 == rc or z2 == zero for z2, rc2 in kept):
                                        continue
                                    mem = sum(
                                        stage_memory(
                                            M,
                                            b,
                                            m,
                                            tp,
                                            pp,
                                            dp,
                                            cp,
                                            v,
                                            zero,
                                            rc,
                                            tp > 1,
                                            schedule,
                                            ep,
                                            None,
                                            A.flash_attention,
                                        )[0].values()
                                    )
                                    if mem > usable:
                                        too_big += 1
                                        if smallest is None or mem < smallest[0]:
                                            smallest = (
                                                mem,
                                                f"tp={tp} pp={pp} cp={cp} ep={ep} b={b} ZeRO-{zero} "
                                                f"recompute={rc}",
                                            )
                                        continue
                                    kept.add((zero, rc))
                                    fits.append(
                                        dict(
                                            tp=tp,
                                            pp=pp,
                                            dp=dp,
                                            cp=cp,
                                            ep=ep,
                                            v=v,
                                            micro_batch=b,
                                            zero_stage=zero,
                                            recompute=rc,
                                            schedule=schedule,
                                        )
                                    )
    if considered == 0:
        raise ValueError(
            f"no layout splits global_batch={M.global_batch} over {gpus} GPUs: the data-parallel "
            f"size must divide the global batch; pick a GPU count or batch with common factors"
        )
    if not fits:
        raise ValueError(
            f"no layout of the {M.params / 1e9:.1f}B model fits on {gpus} x {g.name} "
            f"({g.memory / 1e9:.0f} GB, {usable / 1e9:.0f} GB usable): the smallest needs "
            f"{smallest[0] / 1e9:.1f} GB per GPU ({smallest[1]}). Use more GPUs or a GPU with more memory."
        )

    def run(cfg, sim):
        return estimate(
            M.layers,
            M.hidden,
            M.heads,
            M.vocab,
            M.seq,
            M.global_batch,
            cfg["micro_batch"],
            gpus,
            g,
            cfg["tp"],
            cfg["pp"],
            cfg["dp"],
            cfg["cp"],
            cfg["v"],
            cfg["zero_stage"],
            cfg["recompute"],
            True,
            schedule=cfg["schedule"],
            ep=cfg["ep"],
            overlap_dp=overlap_dp,
            overlap_tp=overlap_tp,
            topology=topo,
            assumptions=A,
            use_simulator=sim,
            **M.arch_kwargs(),
        )

    quick = sorted((run(c, False) for c in fits), key=lambda e: e.step_time)
    ranked = sorted((run(e.config, True) for e in quick[:shortlist]), key=lambda e: e.step_time)
    return Plan(M, gpus, g.name, ranked, considered, too_big, quick[shortlist:])


def _schedules(names, pp: int, m: int, M: ModelShape, max_v: int):
    if pp == 1:
        yield "1f1b", 1
        return
    for name in names:
        if name == "interleaved_1f1b":
            for v in range(2, max_v + 1):
                if M.layers >= pp * v and m % pp == 0:
                    yield name, v
        elif name == "dualpipev":
            if M.experts and m >= 2 * pp and M.layers >= 2 * pp:
                yield name, 1
        elif name != "dualpipe" or (M.experts and pp % 2 == 0 and m % 2 == 0 and m >= 2 * pp):
            yield name, 1
