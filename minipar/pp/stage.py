"""Pipeline stages: the one place a GPT is cut into the pieces a schedule runs.

A stage is a contiguous slice of the reference GPT: the embeddings on the first, its blocks,
the final LayerNorm and the head on the last. Parameter names equal the reference's
("blocks.3.mlp.fc.weight"), so checkpoints and parity tests can compare them by name.

How many blocks each model part holds (`stage_layer_counts`): equal parts when the layers
divide, else the balanced split of `pp.partition`, which counts the output head on the last
stage (Llama 3 puts one block fewer on its first and last stages for the same reason); or
exactly what the user gives (`--stage-layers 3,4,4,3`).

`build_stages` copies the modules it keeps, so no two stages share a tensor (DualPipe holds
two copies of each slice on two ranks); `minipar.compose` passes its own stage class, which
swaps the copies for tensor-, context- and expert-parallel modules.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..model import GPT, GPTConfig
from ..validation import ConfigError
from .actions import Schedule
from .partition import balance_stages, layer_costs

__all__ = ["Stage", "stage_layer_counts", "part_ranges", "build_stages"]


class Stage(nn.Module):
    """A contiguous slice of the GPT (the whole model when first and last)."""

    def __init__(self, gpt: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.wte, self.wpe = copy.deepcopy(gpt.wte), copy.deepcopy(gpt.wpe)
            # positions of this rank's tokens (context and sequence parallelism hold a subset)
            self.register_buffer("pos", torch.arange(gpt.cfg.seq), persistent=False)
        self.blocks = nn.ModuleDict({str(i): copy.deepcopy(gpt.blocks[i]) for i in layers})
        if last:
            self.ln_f, self.head = copy.deepcopy(gpt.ln_f), copy.deepcopy(gpt.head)

    def forward(self, x):
        if self.first:
            x = self.wte(x) + self.wpe(self.pos[: x.shape[1]])
        for blk in self.blocks.values():
            x = blk(x)
        return self.logits(self.ln_f(x)) if self.last else x

    def logits(self, x):
        return self.head(x)

    def aux_loss(self):
        """The MoE blocks' load-balancing losses of the last forward (0 for a dense stage)."""
        return sum((getattr(b.mlp, "aux_loss", 0.0) for b in self.blocks.values()), torch.zeros(()))


def stage_layer_counts(cfg: GPTConfig, parts: int, stage_layers=None) -> list[int]:
    """Transformer blocks per model part (pipeline stage or chunk), in order."""
    if stage_layers is not None:
        counts = list(stage_layers)
        if (
            len(counts) != parts
            or any(not isinstance(n, int) or n < 1 for n in counts)
            or sum(counts) != cfg.layers
        ):
            raise ConfigError(
                [
                    f"the stage layer counts {','.join(map(str, counts))} must be {parts} positive numbers "
                    f"(one per model part: pp*chunks) that sum to the {cfg.layers} layers"
                ]
            )
        return counts
    if cfg.layers < parts:
        raise ConfigError(
            [
                f"layers={cfg.layers} cannot fill {parts} model parts (pp*chunks): every pipeline stage "
                f"needs at least one block; use layers >= {parts} or a smaller pp"
            ]
        )
    if cfg.layers % parts == 0:
        return [cfg.layers // parts] * parts
    return balance_stages(layer_costs(cfg.layers, cfg.hidden, cfg.vocab, cfg.seq, heads=cfg.heads), parts)


def part_ranges(cfg: GPTConfig, parts: int, stage_layers=None) -> list[range]:
    """The blocks of each model part, in order."""
    counts = stage_layer_counts(cfg, parts, stage_layers)
    starts = [sum(counts[:k]) for k in range(parts)]
    return [range(a, a + n) for a, n in zip(starts, counts)]


def build_stages(
    gpt: GPT, schedule: Schedule | None, rank: int, stage_layers=None, make=Stage
) -> dict[int, Stage]:
    """{stage index: make(gpt, blocks, first, last)} for the stages `schedule` puts on `rank`
    (schedule None: one stage holding the whole model)."""
    if schedule is None:
        return {0: make(gpt, range(gpt.cfg.layers), True, True)}
    ranges = part_ranges(gpt.cfg, schedule.num_parts, stage_layers)
    return {
        s: make(gpt, ranges[schedule.part[s]], schedule.part[s] == 0, schedule.part[s] == len(ranges) - 1)
        for s in schedule.stages_of(rank)
    }
