"""What every training loop returns: one shape, whatever the strategy.

A parity test reads the same four things from every loop (principle 1: gradients after the first
backward, then losses and parameters after several steps), so they are named fields here; what
only one strategy measures (TP's logits, ZeRO's memory, a pipeline's times) goes in `extra`.

It is also a mapping, `result["losses"]` or `result["memory"]`, so that a notebook can print it
or pick from it without knowing which fields a strategy fills.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainResult(Mapping):
    losses: list  # the global batch's mean loss, one per step (the same on every rank)
    first_grads: dict | None = None  # name -> gradient after the first backward, before any step
    grads: dict | None = None  # name -> gradient of the last step, before its optimizer step
    params: dict | None = None  # name -> parameter after the last step
    model: Any = None  # the trained module, where one process holds all of it
    extra: dict = field(default_factory=dict)  # what a strategy also measures: logits, memory, times …

    def _named(self) -> dict:
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in named.items() if v is not None} | self.extra

    def __getitem__(self, key: str) -> Any:
        try:
            return self._named()[key]
        except KeyError:
            raise KeyError(f"{key!r}: this loop records {sorted(self._named())}") from None

    def __setitem__(self, key: str, value: Any) -> None:
        """A test or a notebook may add what it measured around the run (e.g. bytes at the backend)."""
        if key in {f.name for f in fields(self)} - {"extra"}:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._named())

    def __len__(self) -> int:
        return len(self._named())
