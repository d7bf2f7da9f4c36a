"""The paged KV cache's bookkeeping: PagedAttention (Kwon et al. 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP, Sec. 4.2) in miniature.

The cache of every layer is one pool of `num_blocks` fixed-size blocks of `block_size` token
slots. A sequence owns a *block table*, the list of its physical blocks in logical order, so
token position p lives at

    slot(p) = table[p // block_size] * block_size + p % block_size

Blocks need not be contiguous: a sequence grows one block at a time, taking whichever block
is free, and returns all of them when it finishes. Waste is at most block_size - 1 slots per
sequence (its last, partly filled block), against a whole maximum-length reservation when a
cache is one contiguous [batch, max_len] tensor per sequence.

Admission. vLLM cannot know when a sequence will stop (EOS), so it allocates lazily and
preempts a sequence when a block runs out. Here every request generates exactly
`max_new_tokens` (greedy, no EOS, like `GPT.generate`), so the blocks a request will ever need
are known when it arrives: a request is admitted only if the free blocks not yet promised to
running sequences cover its whole life. Blocks are still taken one at a time as the sequence
grows (the pool stays shared), but a running sequence can never find the pool empty: nothing
is preempted, nothing crashes, and a full cache only makes admission wait.

One BlockManager serves every layer of a replica: each layer (on whichever pipeline stage
holds it) has its own pool tensor, indexed by the same tables.
"""

from __future__ import annotations

from collections import deque

__all__ = ["BlockManager", "blocks_for", "slots_of"]


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` slots: ceil(tokens / block_size)."""
    return -(-tokens // block_size)


def slots_of(table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """Physical slots of positions start..stop-1 of a sequence with block table `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


class BlockManager:
    """A free-block allocator with one block table per sequence.

    Invariants (`check()`): every block is either free or in exactly one table, and the
    blocks promised to running sequences (`reserved`) never exceed the free ones."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))  # FIFO: freed blocks go to the back
        self.tables: dict[int, list[int]] = {}
        self.promised: dict[int, int] = {}  # seq -> blocks it will still take

    @property
    def reserved(self) -> int:
        return sum(self.promised.values())

    def available(self) -> int:
        """Free blocks that no running sequence is still owed."""
        return len(self.free) - self.reserved

    def can_admit(self, tokens: int) -> bool:
        """Would a sequence that will hold `tokens` K/V slots over its life fit?"""
        return blocks_for(tokens, self.block_size) <= self.available()

    def admit(self, seq: int, tokens: int) -> None:
        """Promise a new sequence the blocks of its whole life (it takes them as it grows)."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq} is already in the cache")
        if not self.can_admit(tokens):
            raise RuntimeError(
                f"sequence {seq} needs {blocks_for(tokens, self.block_size)} blocks, "
                f"{self.available()} are available: call can_admit first"
            )
        self.tables[seq], self.promised[seq] = [], blocks_for(tokens, self.block_size)

    def grow(self, seq: int, tokens: int) -> list[int]:
        """Make the table of `seq` cover `tokens` positions, taking free blocks; returns the table."""
        table = self.tables[seq]
        while len(table) * self.block_size < tokens:
            if self.promised[seq] < 1:
                raise RuntimeError(f"sequence {seq} grew past the {len(table)} blocks it was admitted with")
            table.append(self.free.popleft())
            self.promised[seq] -= 1
        return table

    def release(self, seq: int) -> None:
        """A finished sequence returns its blocks (and whatever was still promised to it)."""
        self.free.extend(self.tables.pop(seq))
        del self.promised[seq]

    def check(self) -> None:
        """Raise AssertionError if a block is lost, owned twice, or over-promised."""
        owned = [b for t in self.tables.values() for b in t]
        every = owned + list(self.free)
        assert len(every) == len(set(every)) == self.num_blocks, (
            f"blocks lost or owned twice: {sorted(every)} (of {self.num_blocks})"
        )
        assert all(n >= 0 for n in self.promised.values()) and self.available() >= 0, (
            f"over-promised: {len(self.free)} free, {self.reserved} promised"
        )
