"""N-D parallelism: one mesh, one config, every strategy composed on each rank.

The mesh is laid out outermost first as

    pp  x  dp  x  ep  x  cp  x  tp          (tp = consecutive ranks)

tp goes innermost because it communicates inside every layer, several times per
micro-batch, and consecutive ranks share a node's fastest links (NVLink); cp next
(a ring of KV blocks per layer); ep/dp exchange once per step (gradients) or per MoE
layer; pp sends only boundary activations, so it may cross the slowest links. This
is Megatron-LM's order (Narayanan et al. 2021, Sec. 3.3: "tensor parallelism within
a node, pipeline parallelism across nodes") with Llama 3's cp and DeepSeek-V3's ep.

Every rank builds the full reference GPT from the seed (or from a checkpoint), keeps
its pipeline stage's layers, splits them for TP (+SP), swaps attention for ring or
Ulysses under CP, and keeps its experts under EP: the composed model *is* the
reference model, cut into pieces. Data: the global batch is split into dp*ep data
shards, each shard's sequence into cp slices, then into micro-batches.

MoE blocks compose with every axis (5D: pp x dp x ep x cp x tp): experts are split over ep
and replicated over dp, cp and tp; each rank routes its own tokens (all of its sequences'
under plain TP, its s/t slice under SP, its cp chunks under CP), and each pipeline stage
backpropagates its own load-balancing loss. Capacity and the aux loss are per group of
tokens, so every forward call (one micro-batch of one data shard) holds whole groups of the
reference's batch; when cp or SP spread a group over ranks, its expert counts are summed
over them (`moe.split_tokens`) and the run is dropless.

Gradients are then averaged over every replica of each parameter, and ZeRO 0-3 shards
the model states over dp: `minipar.optim.Optimizer` (re-exported here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cp import attention_fn, sequence_positions
from .cp import check_config as check_cp
from .ep import expert_parallel
from .mesh import Mesh, check_sizes
from .model import GPT, GPTConfig
from .moe import check_config as check_moe
from .moe import moe_layers, split_tokens
from .optim import Optimizer, stage_units
from .pp import build_schedule
from .pp.stage import Stage, stage_layer_counts
from .pp.stage import build_stages as build_pipeline_stages
from .recompute import apply_recompute
from .tp import (
    ColumnParallelLinear,
    ParallelAttention,
    ParallelBlock,
    VocabParallelEmbedding,
    check_tp,
    column_parallel,
    vocab_parallel_cross_entropy,
)
from .validation import Problems

__all__ = [
    "ParallelConfig",
    "AXES",
    "TRAIN_SCHEDULES",
    "check",
    "ComposedStage",
    "build_stages",
    "stage_layer_counts",
    "mirror_group",
    "Optimizer",
    "stage_units",
]

AXES = ("pp", "dp", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0  # ZeRO stage over dp: 0 all-reduce, 1 optimizer, 2 + gradients, 3 + parameters
    sp: bool = False  # sequence parallelism inside the tp group
    schedule: str = "1f1b"  # pipeline schedule (minipar.pp.build_schedule names)
    microbatches: int = 1  # per data shard and step (the gradient-accumulation steps)
    chunks: int = 1  # model chunks per pipeline rank (interleaved: v)
    cp_method: str = "ring"  # "ring" or "ulysses"
    cp_layout: str = "zigzag"  # "zigzag" or "contiguous"
    recompute: str | None = None  # None, "full" or "selective"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast compute, fp32 master weights)
    stage_layers: tuple | None = None  # blocks per model part (pp*chunks); None: balanced

    @property
    def seq_layout(self) -> str:
        """How the sequence is cut over cp: Ulysses gathers it back in order, so contiguous."""
        return "contiguous" if self.cp_method == "ulysses" else self.cp_layout

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.cp * self.ep

    def axes(self) -> dict:
        return {a: getattr(self, a) for a in AXES}

    def to_dict(self) -> dict:
        return asdict(self)


# Schedules the composed trainer runs. PipeDream (pipedream, pipedream_2bw) updates weights
# asynchronously, so by design it does not follow the single-device curve: see pp.train_pipedream.
TRAIN_SCHEDULES = (
    "naive",
    "gpipe",
    "1f1b",
    "interleaved_1f1b",
    "zb_h1",
    "zb_h2",
    "zbv",
    "dualpipe",
    "dualpipev",
)
# ZeRO-2/3 reduce-scatter from the gradient hooks that backward() fires; the zero-bubble I/W split
# (and DualPipe's) computes weight gradients by hand, outside those hooks.
ZERO23_SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved_1f1b")


def check(
    cfg: GPTConfig,
    pc: ParallelConfig,
    batch: int,
    world_size: int | None = None,
    problems: Problems | None = None,
) -> None:
    """The one validation entry of a composed run: every problem of this combination, in one
    ConfigError, before any process starts. Each rule says why it holds. Sizes are assumed to be
    positive ints already (see `train.validate`, which checks every flag first)."""
    p = Problems() if problems is None else problems
    t, c, shards = pc.tp, pc.cp, pc.dp * pc.ep
    p.merge(check_sizes, pc.world_size if world_size is None else world_size, pc.axes())
    p.choice("zero", pc.zero, (0, 1, 2, 3))
    p.choice("schedule", pc.schedule, TRAIN_SCHEDULES)
    pipelined = pc.pp > 1 or pc.chunks > 1
    if pipelined and pc.schedule in TRAIN_SCHEDULES:
        if pc.zero >= 2 and pc.schedule not in ZERO23_SCHEDULES:
            p.add(
                f"{p.show('zero', pc.zero)} with {p.show('schedule', pc.schedule)}: ZeRO-2/3 reduce-scatter "
                "from the gradient hooks of backward(), and this schedule's I/W split computes weight gradients "
                f"by hand: use {', '.join(ZERO23_SCHEDULES[1:])}, or {p.name('zero')} 1"
            )
        try:
            schedule = build_schedule(pc.schedule, pc.pp, pc.microbatches, pc.chunks)
        except ValueError as e:  # the generator states its own rule (e.g. interleaved: m % p == 0)
            p.add(f"{p.show('schedule', pc.schedule)}: {e}")
        else:
            p.merge(stage_layer_counts, cfg, schedule.num_parts, pc.stage_layers)
    elif pc.stage_layers is not None and tuple(pc.stage_layers) != (cfg.layers,):
        p.add(f"{p.name('stage_layers')} splits layers over pipeline stages: it needs {p.name('pp')} > 1")
    # each strategy states its own rules (and why they hold)
    check_tp(cfg, t, pc.sp, cfg.seq // c if cfg.seq % c == 0 else cfg.seq, problems=p)
    check_cp(cfg, c, pc.cp_method, pc.seq_layout, t, problems=p)
    # the global batch is cut into dp*ep equal data shards, each into equal micro-batches
    if batch % shards:
        p.add(
            f"{p.show('batch', batch)} must split into dp*ep={shards} equal data shards: use a multiple of {shards}"
        )
    elif (batch // shards) % pc.microbatches:
        p.add(
            f"each data shard's {batch // shards} sequences must split into {pc.microbatches} equal "
            f"micro-batches: make {p.name('batch')} a multiple of dp*ep*microbatches={shards * pc.microbatches}"
        )
    if cfg.experts:
        p.merge(check_moe, cfg, pc.ep)
        if (c > 1 or pc.sp) and cfg.capacity_factor != float("inf"):
            p.add(
                "with cp or sp a group's tokens are spread over ranks, and token dropping ranks them by "
                "position within the group: MoE must be dropless there (capacity_factor = inf)"
            )
        if cfg.moe_groups % (shards * pc.microbatches):
            p.add(
                f"moe_groups={cfg.moe_groups} must be a multiple of dp*ep*microbatches="
                f"{shards * pc.microbatches}: capacity and the aux loss are per group of tokens, and each "
                "micro-batch of each data shard must hold whole groups"
            )
    elif pc.ep > 1:
        p.add(
            f"{p.show('ep', pc.ep)} splits experts over ranks: it needs an MoE model ({p.name('experts')} > 0)"
        )
    if problems is None:
        p.raise_if_any("this parallel configuration cannot run")


class ComposedStage(Stage):
    """One pipeline stage (the whole model when pp = 1) of the composed GPT on this rank: the
    pipeline's `Stage` with its modules swapped for their parallel versions.

    Parameter names equal the reference's ("blocks.3.attn.q.weight"); TP-split ones carry
    `tp_dim`, so checkpoints and parity tests can rebuild the full tensors."""

    def __init__(self, ref: GPT, layers: range, first: bool, last: bool, pc: ParallelConfig, mesh: Mesh):
        super().__init__(ref, layers, first, last)
        self.pc = pc
        tp, sp = pc.tp > 1, pc.sp
        if first:
            if tp:
                self.wte = VocabParallelEmbedding(ref.wte, "tp", sp)
            pos = torch.arange(ref.cfg.seq)
            if pc.cp > 1:
                pos = sequence_positions(ref.cfg.seq, mesh.index("cp"), pc.cp, pc.seq_layout)
            if sp:  # SP keeps s/t of this rank's tokens between the TP regions
                pos = pos.chunk(pc.tp)[mesh.index("tp")]
            self.pos = pos
        for i in layers:
            blk = self.blocks[str(i)]
            if tp and ref.cfg.is_moe(i):  # attention split over tp; experts replicated over it
                blk.attn = ParallelAttention(ref.blocks[i].attn, "tp", sp)
            elif tp:
                self.blocks[str(i)] = blk = ParallelBlock(ref.blocks[i], "tp", sp)
            if pc.cp > 1:
                blk.attn.attn_fn = attention_fn(pc.cp_method, pc.seq_layout, "cp")
        if last and tp:
            self.head = ColumnParallelLinear(ref.head, "tp")
        for p in self.parameters():
            p.tp_dim = getattr(p, "tp_dim", None)
            p.sequence_parallel = sp and p.tp_dim is None  # saw only this rank's s/t tokens: summed over tp
        if pc.recompute:
            apply_recompute(self, pc.recompute)

    def logits(self, x):
        if self.pc.tp == 1:
            return self.head(x)
        # The logits stay split over the vocabulary (gathered along s under SP). ZeRO-3 gathers
        # the head's weight in its module hooks, so under SP the head must be called as a module
        # (regather=False) rather than through gather_linear's raw weights.
        (logits,) = column_parallel(x, [self.head], "tp", self.pc.sp, regather=self.pc.zero < 3)
        return logits


def mirror_group(mesh: Mesh, p: int):
    """DualPipe keeps every layer slice on two ranks of a pipeline, r and p-1-r (one copy per
    direction); their gradients are summed before the step. Every rank creates every pair's
    group, in the same order (torch's contract for new_group). Returns this rank's pair."""
    mine = None
    for ranks in mesh.groups("pp"):  # one pipeline per coordinate of the other axes
        for r in range(p // 2):
            pair = [ranks[r], ranks[p - 1 - r]]
            g = dist.new_group(pair)
            if mesh.rank in pair:
                mine = g
    return mine


def loss_of(logits, y, pc: ParallelConfig):
    """Mean cross-entropy over this rank's tokens (vocab-parallel under TP: no full logits)."""
    if pc.tp > 1:
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), y.flatten(), "tp")
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def build_stages(
    cfg: GPTConfig, pc: ParallelConfig, mesh: Mesh, seed: int = 0, state: dict | None = None, schedule=None
) -> dict:
    """{stage index: ComposedStage} for this rank, through the pipeline's one stage builder.
    `state` (full tensors by name) overrides the seed's initial weights, e.g. when resuming
    from a checkpoint saved under another layout."""
    ref = GPT(cfg, seed)
    if state is not None:
        ref.load_state_dict({k: v for k, v in state.items() if k in ref.state_dict()}, strict=False)
    if cfg.experts:
        if pc.ep > 1:
            expert_parallel(ref, mesh, groups=cfg.moe_groups // (pc.dp * pc.ep * pc.microbatches))
        # capacity and the aux loss are per group of tokens: each forward call (one micro-batch
        # of one data shard) holds whole groups of the reference's global batch, whose tokens
        # are spread over cp (and tp under SP)
        for layer in moe_layers(ref):
            layer.groups = cfg.moe_groups // (pc.dp * pc.ep * pc.microbatches)
        split_tokens(
            ref, tuple(a for a, on in (("cp", pc.cp > 1), ("tp", pc.sp)) if on), 1.0 / pc.tp if pc.sp else 1.0
        )
    make = partial(ComposedStage, pc=pc, mesh=mesh)
    return build_pipeline_stages(ref, schedule, mesh.index("pp"), pc.stage_layers, make)
