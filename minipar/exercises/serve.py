"""Exercise of notebook 11: the iteration-level scheduler's admission rule.

serve_admission: write
    can_join(request, now, batch, max_batch, available_blocks, block_size) -> bool
True when the waiting `request` may join the running batch at time `now`: it has arrived, the
batch (`batch` sequences now) has room under `max_batch`, and the `available_blocks` (free
blocks no running sequence is still owed) hold every K/V slot it will ever need. A request
caches its prompt and every generated token but the last: len(prompt) + max_new_tokens - 1.

The checker asks it about seven situations, then plugs it into `minipar.serve.Scheduler` and
serves a trace through a cache too small for all requests at once: nothing may be admitted
that the cache cannot hold, and every request must finish.
"""
from __future__ import annotations

from . import Verdict, checker
from ..serve import Request, Scheduler, blocks_for, make_requests


def _reference(request, now, batch, max_batch, available_blocks, block_size) -> bool:
    return (request.arrival <= now and batch < max_batch
            and blocks_for(len(request.prompt) + request.max_new_tokens - 1, block_size) <= available_blocks)


def _req(prompt: int, new: int, arrival: float = 0.0) -> Request:
    return Request(0, tuple(range(prompt)), new, arrival)


# (what it tests, request, now, batch, max_batch, available blocks, block size)
CASES = [
    ("5 prompt + 4 new tokens cache 8 slots = 2 blocks of 4, 2 available", _req(5, 4), 0.0, 0, 4, 2, 4),
    ("the same request with 1 block available", _req(5, 4), 0.0, 0, 4, 1, 4),
    ("4 + 5 tokens cache 8 slots (the last token is never fed back): 2 blocks fit", _req(4, 5), 0.0, 1, 4, 2, 4),
    ("6 + 4 tokens cache 9 slots = 3 blocks, 2 available", _req(6, 4), 0.0, 1, 4, 2, 4),
    ("a request that arrives at t=1.0, asked at t=0.5", _req(3, 2, 1.0), 0.5, 0, 4, 8, 4),
    ("a full batch (4 of max 4)", _req(3, 2), 0.0, 4, 4, 8, 4),
    ("a 1-token prompt asking for 1 token, block size 1", _req(1, 1), 0.0, 0, 1, 1, 1),
]
HINTS = {0: "count the slots the request holds at its end: its prompt and every new token but the last; "
            "blocks = ceil(slots / block_size)",
         4: "a request that has not arrived yet (arrival > now) cannot join",
         5: "the batch is full when batch == max_batch"}


class _Plugged(Scheduler):
    """The notebook's Scheduler with the student's rule in place of `can_join`."""

    def __init__(self, rule, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = rule

    def can_join(self, request, now, batch):
        return bool(self.rule(request, now, batch, self.max_batch, self.blocks.available(), self.blocks.block_size))


@checker("serve_admission")
def check_admission(solution) -> Verdict:
    """`solution(request, now, batch, max_batch, available_blocks, block_size)` -> bool, like `_reference`."""
    for i, (label, *args) in enumerate(CASES):
        got, want = solution(*args), _reference(*args)
        if got is None:
            return Verdict(False, f"{label}: returned None", "return True or False")
        got = bool(got)
        if got != want:
            hint = HINTS.get(4 if args[0].arrival > args[1] else 5 if args[2] >= args[3] else 0)
            return Verdict(False, f"{label}: said {got}, expected {want}", hint)
    requests = make_requests(12, 64, "2:9", "1:8", arrival_rate=40.0, seed=3)
    sched = _Plugged(solution, num_blocks=6, block_size=4, max_batch=4)   # room for two long requests at a time
    pending, finished, now = list(requests), set(), 0.0
    for _ in range(1000):
        while pending and pending[0].arrival <= now:
            sched.add(pending.pop(0))
        try:
            step = sched.step(now)
        except RuntimeError as e:          # the block manager refuses to over-promise or over-grow
            return Verdict(False, f"serving a 12-request trace through a 6-block cache: {e}",
                           HINTS[0])
        sched.blocks.check()
        finished |= {w.seq for w in step.works if w.last}
        now += 0.01
        if not pending and not sched.busy:
            break
    if len(finished) < len(requests):
        return Verdict(False, f"{len(requests) - len(finished)} of {len(requests)} requests never finished",
                       "a request that fits must be admitted once blocks are free")
    return Verdict(True, f"the admission rule matches on {len(CASES)} cases and serves a 12-request trace "
                         f"through a 6-block cache ({sched.cache_waits} steps waited for blocks)")
