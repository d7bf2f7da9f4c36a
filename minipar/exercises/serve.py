"""Exercise of notebook 11: the iteration-level scheduler's admission rule.

serve_admission: write
    can_join(request, now, batch, max_batch, available_blocks, block_size) -> bool
True when the waiting `request` may join the running batch at time `now`: it has arrived, the
batch (`batch` sequences now) has room under `max_batch`, and the `available_blocks` (free
blocks no running sequence is still owed) hold every K/V slot it will ever need. A request
caches its prompt and every generated token but the last: len(prompt) + max_new_tokens - 1
(Kwon et al. 2023, vLLM: the paged cache; Yu et al. 2022, Orca: iteration-level scheduling).

The checker asks it about fixed and randomized situations, then plugs it into
`minipar.serve.Scheduler` and serves traces through a cache too small for all requests at once:
nothing may be admitted that the cache cannot hold, and every request must finish. The package's
own rule (`Scheduler.can_join`, `BlockManager.can_admit`, `Request.cache_tokens`) is disabled
while the student's code runs.
"""

from __future__ import annotations

from ..serve import BlockManager, Request, Scheduler, blocks_for, make_requests
from . import Case, Exercise, exercise, student


def _expected(request, now, batch, max_batch, available_blocks, block_size) -> bool:
    return (
        request.arrival <= now
        and batch < max_batch
        and blocks_for(len(request.prompt) + request.max_new_tokens - 1, block_size) <= available_blocks
    )


def _req(prompt: int, new: int, arrival: float = 0.0) -> Request:
    return Request(0, tuple(range(prompt)), new, arrival)


# (what it tests, (prompt, new, arrival), now, batch, max_batch, available blocks, block size)
SITUATIONS = [
    ("5 prompt + 4 new tokens cache 8 slots = 2 blocks of 4, 2 available", (5, 4, 0.0), 0.0, 0, 4, 2, 4),
    ("the same request with 1 block available", (5, 4, 0.0), 0.0, 0, 4, 1, 4),
    (
        "4 + 5 tokens cache 8 slots (the last token is never fed back): 2 blocks fit",
        (4, 5, 0.0),
        0.0,
        1,
        4,
        2,
        4,
    ),
    ("6 + 4 tokens cache 9 slots = 3 blocks, 2 available", (6, 4, 0.0), 0.0, 1, 4, 2, 4),
    ("a request that arrives at t=1.0, asked at t=0.5", (3, 2, 1.0), 0.5, 0, 4, 8, 4),
    ("a full batch (4 of max 4)", (3, 2, 0.0), 0.0, 4, 4, 8, 4),
    ("a 1-token prompt asking for 1 token, block size 1", (1, 1, 0.0), 0.0, 0, 1, 1, 1),
]
HINTS = {
    "blocks": "count the slots the request holds at its end: its prompt and every new token but the last; "
    "blocks = ceil(slots / block_size)",
    "early": "a request that has not arrived yet (arrival > now) cannot join",
    "full": "the batch is full when batch == max_batch",
}


def _cases(rng):
    cases = [Case(label, ("ask", *args)) for label, *args in SITUATIONS]
    for _ in range(3):
        p, n, bs = rng.randint(1, 12), rng.randint(1, 12), rng.choice([1, 2, 4, 8])
        need = blocks_for(p + n - 1, bs)
        args = (
            (p, n, rng.choice([0.0, 1.0])),
            rng.choice([0.5, 2.0]),
            rng.randint(0, 4),
            4,
            need + rng.choice([-1, 0, 1]),
            bs,
        )
        cases.append(
            Case(
                f"random case: {p} prompt + {n} new tokens, block size {bs}, {args[4]} blocks free, "
                f"batch {args[2]} of 4, arrival {args[0][2]:g}, now {args[1]:g}",
                ("ask", *args),
                random=True,
            )
        )
    cases.append(Case("serving a 12-request trace through a 6-block cache", ("serve", 3), points=3))
    seed = rng.randint(4, 10_000)
    cases.append(
        Case(
            f"random case: serving a 12-request trace (seed {seed}) through a 6-block cache",
            ("serve", seed),
            points=3,
            random=True,
        )
    )
    return cases


class _Plugged(Scheduler):
    """The notebook's Scheduler with the student's rule in place of `can_join`."""

    def __init__(self, rule, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = rule

    def can_join(self, request, now, batch):
        return bool(
            student(
                self.rule,
                request,
                now,
                batch,
                self.max_batch,
                self.blocks.available(),
                self.blocks.block_size,
            )
        )


def _serve(solution, seed: int):
    """(finished, requests, error) of serving a trace with the student's rule."""
    requests = make_requests(12, 64, "2:9", "1:8", arrival_rate=40.0, seed=seed)
    sched = _Plugged(
        solution, num_blocks=6, block_size=4, max_batch=4
    )  # room for two long requests at a time
    pending, finished, now = list(requests), set(), 0.0
    for _ in range(1000):
        while pending and pending[0].arrival <= now:
            sched.add(pending.pop(0))
        try:
            step = sched.step(now)
        except RuntimeError as e:  # the block manager refuses to over-promise or over-grow
            return len(finished), len(requests), str(e)
        sched.blocks.check()
        finished |= {w.seq for w in step.works if w.last}
        now += 0.01
        if not pending and not sched.busy:
            break
    return len(finished), len(requests), ""


def _run(solution, case):
    if case.args[0] == "serve":
        return _serve(solution, case.args[1])
    (p, n, arrival), *rest = case.args[1:]
    got = student(solution, _req(p, n, arrival), *rest)
    return None if got is None else bool(got)


def _judge(case, outputs):
    got = outputs[0]
    if case.args[0] == "serve":
        finished, total, error = got
        if error:
            return (error, HINTS["blocks"])
        if finished < total:
            return (
                f"{total - finished} of {total} requests never finished",
                "a request that fits must be admitted once blocks are free",
            )
        return None
    (p, n, arrival), now, batch, max_batch, avail, bs = case.args[1:]
    want = _expected(_req(p, n, arrival), now, batch, max_batch, avail, bs)
    if got is None:
        return ("returned None", "return True or False")
    if got != want:
        hint = HINTS["early" if arrival > now else "full" if batch >= max_batch else "blocks"]
        return (f"said {got}, expected {want}", hint)
    return None


exercise(
    Exercise(
        name="serve_admission",
        notebook="11_parallel_inference",
        function="can_join",
        cases=_cases,
        run=_run,
        judge=_judge,
        forbidden=(Scheduler.can_join, BlockManager.can_admit, Request.cache_tokens.fget, _expected),
        deadline=20.0,
        summary="the admission rule answers every situation and serves the traces through a cache too small for "
        "everyone at once",
    )
)
