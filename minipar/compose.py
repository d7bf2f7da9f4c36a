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

MoE blocks compose with dp, ep, tp and pp: experts are split over ep and replicated over tp
(every tp rank routes the same tokens), and each pipeline stage backpropagates its own
load-balancing loss. Capacity and the aux loss are per group of tokens, so every forward
call (one micro-batch of one data shard) holds whole groups of the reference's batch.

Gradients are then averaged over every replica of each parameter, and ZeRO 0-3 shards
the model states over dp: `minipar.optim.Optimizer` (re-exported here).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mesh import Mesh, check_sizes
from .model import GPT, GPTConfig
from .optim import Optimizer, stage_units

__all__ = ["ParallelConfig", "AXES", "check", "ComposedStage", "build_stages", "stage_layers", "Optimizer",
           "stage_units"]

AXES = ("pp", "dp", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0                     # ZeRO stage over dp: 0 all-reduce, 1 optimizer, 2 + gradients, 3 + parameters
    sp: bool = False                  # sequence parallelism inside the tp group
    schedule: str = "1f1b"            # pipeline schedule (minipar.pp.build_schedule names)
    microbatches: int = 1             # per data shard and step (the gradient-accumulation steps)
    chunks: int = 1                   # model chunks per pipeline rank (interleaved: v)
    cp_method: str = "ring"           # "ring" or "ulysses"
    cp_layout: str = "zigzag"         # "zigzag" or "contiguous"
    recompute: str | None = None      # None, "full" or "selective"
    precision: str = "fp32"           # "fp32" or "bf16" (autocast compute, fp32 master weights)

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


def check(cfg: GPTConfig, pc: ParallelConfig, batch: int, world_size: int | None = None) -> None:
    """Every problem with this combination, in one ValueError, before any process starts."""
    problems = []
    try:
        check_sizes(pc.world_size if world_size is None else world_size, pc.axes())
    except ValueError as e:
        problems.append(str(e))
    t, c = pc.tp, pc.cp
    if pc.zero not in (0, 1, 2, 3):
        problems.append(f"--zero {pc.zero}: ZeRO stages are 0, 1, 2 and 3")
    elif pc.zero >= 2 and pc.schedule not in ("gpipe", "1f1b", "interleaved_1f1b") and (pc.pp > 1 or pc.chunks > 1):
        problems.append(f"--zero {pc.zero} with --schedule {pc.schedule}: ZeRO-2/3 reduce-scatter from the "
                        "gradient hooks of backward(), and the zero-bubble I/W split computes weight gradients "
                        "by hand: use gpipe, 1f1b or interleaved_1f1b, or --zero 1")
    if cfg.heads % t or cfg.hidden % t:
        problems.append(f"heads={cfg.heads} and hidden={cfg.hidden} must be divisible by tp={t}")
    if cfg.vocab % t:
        problems.append(f"vocab={cfg.vocab} must be divisible by tp={t} (the vocab-parallel head splits it)")
    if pc.sp and t == 1:
        problems.append("sequence parallelism (--sp) splits the sequence over the tp group: it needs tp > 1")
    local_seq = cfg.seq // max(c, 1)
    if c > 1 and pc.seq_layout == "zigzag" and cfg.seq % (2 * c):
        problems.append(f"seq={cfg.seq} must be divisible by 2*cp={2 * c} for the zigzag layout")
    elif c > 1 and cfg.seq % c:
        problems.append(f"seq={cfg.seq} must be divisible by cp={c}")
    if pc.sp and local_seq % t:
        problems.append(f"the sequence each rank holds ({local_seq}) must be divisible by tp={t} under --sp")
    if pc.cp_method not in ("ring", "ulysses"):
        problems.append(f"--cp-method {pc.cp_method!r}: use ring or ulysses")
    elif c > 1 and pc.cp_method == "ulysses" and (cfg.heads // max(t, 1)) % c:
        problems.append(f"Ulysses needs the heads per tp rank ({cfg.heads}/{t}) divisible by cp={c}: "
                        "lower cp or tp, or use --cp-method ring")
    if pc.cp_layout not in ("zigzag", "contiguous"):
        problems.append(f"--cp-layout {pc.cp_layout!r}: use zigzag or contiguous")
    if pc.recompute not in (None, "full", "selective"):
        problems.append(f"--recompute {pc.recompute!r}: use full or selective")
    if pc.precision not in ("fp32", "bf16"):
        problems.append(f"--precision {pc.precision!r}: use fp32 or bf16")
    shards = pc.dp * pc.ep
    if batch % shards:
        problems.append(f"batch={batch} must split into dp*ep={shards} equal data shards")
    elif (batch // shards) % pc.microbatches:
        problems.append(f"each data shard's {batch // shards} sequences must split into "
                        f"{pc.microbatches} equal micro-batches")
    if cfg.experts:
        shards *= pc.microbatches
        if cfg.experts % pc.ep:
            problems.append(f"experts={cfg.experts} must be divisible by ep={pc.ep}")
        if c > 1 or pc.sp:
            problems.append("MoE blocks compose with dp, ep, tp and pp here; not with cp or sp (capacity groups "
                            "and experts replicated over tp need every tp rank to see the same whole tokens)")
        if cfg.moe_groups % shards:
            problems.append(f"moe_groups={cfg.moe_groups} must be a multiple of dp*ep*microbatches={shards}: "
                            "capacity and the aux loss are per group of tokens, and each micro-batch of each "
                            "data shard must hold whole groups")
    elif pc.ep > 1:
        problems.append(f"ep={pc.ep} needs an MoE model (--experts > 0)")
    if pc.pp > 1 or pc.chunks > 1:
        from .pp import build_schedule
        if cfg.layers % (pc.pp * pc.chunks):
            problems.append(f"layers={cfg.layers} must be divisible by pp*chunks={pc.pp * pc.chunks} "
                            "(each model chunk gets the same number of blocks)")
        try:
            build_schedule(pc.schedule, pc.pp, pc.microbatches, pc.chunks)
        except ValueError as e:
            problems.append(f"schedule {pc.schedule!r}: {e}")
    if problems:
        raise ValueError("this parallel configuration cannot work:\n  - " + "\n  - ".join(problems))


def stage_layers(cfg: GPTConfig, parts: int, part: int) -> range:
    per = cfg.layers // parts
    return range(part * per, (part + 1) * per)


class ComposedStage(nn.Module):
    """One pipeline stage (the whole model when pp = 1) of the composed GPT on this rank.

    Parameter names equal the reference's ("blocks.3.attn.q.weight"); TP-split ones carry
    `tp_dim`, so checkpoints and parity tests can rebuild the full tensors."""

    def __init__(self, ref: GPT, layers: range, first: bool, last: bool, pc: ParallelConfig, mesh: Mesh):
        super().__init__()
        from . import cp as cpm
        from .tp import ColumnParallelLinear, ParallelAttention, ParallelBlock, VocabParallelEmbedding
        self.first, self.last, self.pc = first, last, pc
        tp, sp = pc.tp > 1, pc.sp
        if first:
            self.wte = VocabParallelEmbedding(ref.wte, "tp", sp) if tp else copy.deepcopy(ref.wte)
            self.wpe = copy.deepcopy(ref.wpe)
            pos = torch.arange(ref.cfg.seq)
            if pc.cp > 1:
                pos = cpm.sequence_positions(ref.cfg.seq, mesh.index("cp"), pc.cp, pc.seq_layout)
            if sp:  # SP keeps s/t of this rank's tokens between the TP regions
                pos = pos.chunk(pc.tp)[mesh.index("tp")]
            self.register_buffer("pos", pos, persistent=False)
        self.blocks = nn.ModuleDict()
        for i in layers:
            blk = ref.blocks[i]
            self.blocks[str(i)] = ParallelBlock(blk, "tp", sp) if tp and not ref.cfg.is_moe(i) else copy.deepcopy(blk)
            if tp and ref.cfg.is_moe(i):  # attention split over tp, experts replicated over it
                self.blocks[str(i)].attn = ParallelAttention(blk.attn, "tp", sp)
            if pc.cp > 1:
                self.blocks[str(i)].attn.attn_fn = cpm.attention_fn(pc.cp_method, pc.seq_layout, "cp")
        if last:
            self.ln_f = copy.deepcopy(ref.ln_f)
            self.head = ColumnParallelLinear(ref.head, "tp") if tp else copy.deepcopy(ref.head)
        for p in self.parameters():
            p.tp_dim = getattr(p, "tp_dim", None)
            p.sequence_parallel = sp and p.tp_dim is None
        if pc.recompute:
            from .recompute import apply_recompute
            apply_recompute(self, pc.recompute)

    def forward(self, x):
        if self.first:
            x = self.wte(x) + self.wpe(self.pos)
        for blk in self.blocks.values():
            x = blk(x)
        if not self.last:
            return x
        if self.pc.tp > 1:  # logits stay split over the vocabulary (and gathered along s under SP)
            from .tp import column_parallel
            # ZeRO-3 gathers the head's weight in its module hooks, so under SP the head must be
            # called as a module (regather=False) rather than through gather_linear's raw weights
            (logits,) = column_parallel(self.ln_f(x), [self.head], "tp", self.pc.sp, regather=self.pc.zero < 3)
            return logits
        return self.head(self.ln_f(x))

    def aux_loss(self):
        return sum((getattr(b.mlp, "aux_loss", 0.0) for b in self.blocks.values()), torch.zeros(()))


def loss_of(logits, y, pc: ParallelConfig):
    """Mean cross-entropy over this rank's tokens (vocab-parallel under TP: no full logits)."""
    if pc.tp > 1:
        from .tp import vocab_parallel_cross_entropy
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), y.flatten(), "tp")
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def build_stages(cfg: GPTConfig, pc: ParallelConfig, mesh: Mesh, seed: int = 0, state: dict | None = None,
                 schedule=None) -> dict:
    """{stage index: ComposedStage} for this rank. `state` (full tensors by name) overrides the
    seed's initial weights, e.g. when resuming from a checkpoint saved under another layout."""
    ref = GPT(cfg, seed)
    if state is not None:
        ref.load_state_dict({k: v for k, v in state.items() if k in ref.state_dict()}, strict=False)
    if cfg.experts:
        from .ep import expert_parallel
        from .moe import moe_layers
        if pc.ep > 1:
            expert_parallel(ref, mesh)
        # capacity and the aux loss are per group of tokens: each forward call (one micro-batch
        # of one data shard) must hold whole groups of the reference's global batch
        for layer in moe_layers(ref):
            layer.groups = cfg.moe_groups // (pc.dp * pc.ep * pc.microbatches)
    if schedule is None:
        return {0: ComposedStage(ref, range(cfg.layers), True, True, pc, mesh)}
    parts, out = schedule.num_parts, {}
    for s in schedule.stages_of(mesh.index("pp")):
        k = schedule.part[s]
        out[s] = ComposedStage(ref, stage_layers(cfg, parts, k), k == 0, k == parts - 1, pc, mesh)
    return out
