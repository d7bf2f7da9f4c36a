"""DualPipe and DualPipeV (DeepSeek-V3 technical report, 2024, Sec. 3.2.1 and Table 2), as data.

    method     bubble                  parameters  activations  devices
    1F1B       (PP-1)(F+B)             1x          PP           PP
    ZB1P       (PP-1)(F+B-2W)          1x          PP           PP
    DualPipe   (PP/2-1)(F&B+B-3W)      2x          PP+1         PP
    DualPipeV  (PP/2-1)(F&B+B-3W)      2x          PP+1         PP/2
F, B and W are one chunk's forward, full backward and weight-gradient costs; F&B is a
forward and a backward chunk run overlapped (one's compute hides the other's all-to-all).
PP is the number of stages: p ranks for DualPipe, 2p stages on p devices for DualPipeV.
DualPipe feeds micro-batches from both ends of the pipeline at once (each rank holds a
stage of each direction: 2x parameters); DualPipeV folds that into a V on half the devices.

Where the bubble comes from: the main step is pairs F&B, and a pair starts only when both
its forward input and its backward gradient have arrived. The generator records the pairs
in `Schedule.overlapped`; the simulator and the executor start each pair as one unit, and
then the bubble the simulator measures is the table's exactly (tests/test_pp_schedules.py):
every rank idles (PP/2-1)(F&B+B-3W) when F&B = F+B, and the worst rank does when the
overlap hides some of it.
"""

from __future__ import annotations

from collections import defaultdict

from .actions import Action


def _dualpipe_rank(n, pos, chunks, s0, s1, first0, first1):
    """DeepSeek's DualPipe step() for one rank (github.com/deepseek-ai/DualPipe), as data.

    n ranks in the V (DualPipeV) or n = p/2 half-ranks (DualPipe); pos = this rank's
    distance from the start; `chunks` micro-batches per phase; phase 0 runs stage s0
    (micro-batches first0, first0+1, ...), phase 1 stage s1. B is a full backward; with
    zero bubble on, an I is emitted and its W queued, to be popped by a later W slot.
    DualPipe overlaps an F of one phase with a B of the other ("F&B"): listed one after
    the other, and returned as `pairs` so the simulator and executor start them together."""
    acts, queue, pairs = [], [], []
    cnt = defaultdict(int)
    stage, first = (s0, s1), (first0, first1)

    def f(ph):
        acts.append(Action(stage[ph], "F", first[ph] + cnt[ph, "F"]))
        cnt[ph, "F"] += 1

    def b(ph, zb=False):
        a = Action(stage[ph], "I" if zb else "B", first[ph] + cnt[ph, "B"])
        cnt[ph, "B"] += 1
        acts.append(a)
        if zb:
            queue.append(Action(a.stage, "W", a.mb))

    def w():
        if queue:
            acts.append(queue.pop(0))

    def fb(f_ph, b_ph):  # F&B: one phase's F overlapped with the other's B
        f(f_ph), b(b_ph)
        pairs.append((acts[-2], acts[-1]))

    for _ in range((n - pos - 1) * 2):  # 1: nF0
        f(0)
    for _ in range(pos + 1):  # 2: nF0F1
        f(0), f(1)
    for _ in range(n - pos - 1):  # 3: nB1W1F1 (zero bubble)
        b(1, zb=True), w(), f(1)
    for _ in range(chunks - 2 * n + pos + 1):  # 4: nF0B1F1B0 (main step)
        fb(0, 1), fb(1, 0)
    for _ in range(n - pos - 1):  # 5: nB1F1B0
        b(1), fb(1, 0)
    zb = False
    for i in range(pos + 1):  # 6: nB1B0 (second half zero bubble)
        if i == (pos + 1) // 2 and pos % 2 == 1:
            zb = True
        b(1, zb)
        if i == (pos + 1) // 2 and pos % 2 == 0:
            zb = True
        b(0, zb)
    for _ in range(n - pos - 1):  # 7: nWB0 (zero bubble)
        w(), b(0, zb=True)
    for _ in range(pos + 1):  # 8: nW
        w()
    while queue:
        w()
    return acts, pairs


def _collect(per_rank):
    """{rank: (acts, pairs)} -> ({rank: acts}, {F: B} of every F&B pair)."""
    return {r: a for r, (a, _) in per_rank.items()}, dict(x for _, ps in per_rank.values() for x in ps)


def _dualpipev(p, m, v):
    return _collect({r: _dualpipe_rank(p, r, m, r, 2 * p - 1 - r, 0, 0) for r in range(p)})


def _dualpipe(p, m, v):
    """Two mirrored pipelines: micro-batches 0..m/2-1 flow down ranks 0..p-1 through stages
    0..p-1; m/2..m-1 flow up ranks p-1..0 through stages p..2p-1 (stage p+k holds the same
    layers as stage k). Each rank runs the phase in which it is nearer the start as phase 0."""
    out, h = {}, p // 2
    for r in range(p):
        down, up = r, p + (p - 1 - r)
        if r < h:
            out[r] = _dualpipe_rank(h, r, m // 2, down, up, 0, m // 2)
        else:
            out[r] = _dualpipe_rank(h, p - 1 - r, m // 2, up, down, m // 2, 0)
    return _collect(out)
