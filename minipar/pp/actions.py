"""The data a pipeline schedule is made of: actions like `0F1` and the per-rank lists holding them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Action", "Schedule", "parse_action", "COMPUTE", "COMM"]

COMPUTE = ("F", "B", "I", "W")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    mb: int
    peer: int | None = field(default=None, compare=False)  # the other rank of a SEND/RECV

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    __repr__ = __str__

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


def parse_action(s: str) -> Action:
    """'0F1' -> Action(0, 'F', 1); also '2SEND_F3'."""
    m = re.fullmatch(r"(\d+)(F|B|I|W|SEND_F|RECV_F|SEND_B|RECV_B)(\d+)", s)
    if not m:
        raise ValueError(f"cannot parse action {s!r}; write it like '0F1' (stage, kind, micro-batch)")
    return Action(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass
class Schedule:
    """Per-rank action lists plus the placement they assume.

    `paths[mb]` is the ordered stages micro-batch `mb` visits (all stages, except in
    DualPipe where each half of the micro-batches runs through one of two mirrored
    pipelines). `part[stage]` is which slice of the model's layers a stage holds.
    `chunk_cost` is the fraction of a rank's per-micro-batch t_f/t_b one action costs.
    `update_every` is None for synchronous schedules (one optimizer step per batch),
    else the number of backwards between weight updates (PipeDream 1, 2BW m).
    `overlapped` maps the F of each of DualPipe's "F&B" pairs to its B: a forward and the
    next action on its rank, a backward of another stage, run as one unit that starts when
    both inputs have arrived (DeepSeek overlaps one's compute with the other's all-to-all)."""

    name: str
    num_ranks: int
    num_microbatches: int
    num_chunks: int
    stage_to_rank: tuple
    actions: dict
    paths: tuple
    part: tuple
    chunk_cost: float = 1.0
    update_every: int | None = None
    overlapped: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def num_parts(self) -> int:
        return max(self.part) + 1

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def prev_stage(self, stage: int, mb: int) -> int | None:
        path = self.paths[mb]
        i = path.index(stage)
        return path[i - 1] if i > 0 else None

    def next_stage(self, stage: int, mb: int) -> int | None:
        path = self.paths[mb]
        i = path.index(stage)
        return path[i + 1] if i + 1 < len(path) else None

    def __str__(self) -> str:
        w = max(len(str(a)) for acts in self.actions.values() for a in acts)
        return "\n".join(
            f"rank {r}: " + " ".join(f"{str(a):>{w}}" for a in acts)
            for r, acts in sorted(self.actions.items())
        )
