"""Zero Bubble schedules (Qi et al., ICLR 2024): ZB-H1, ZB-H2 and ZB-V, as data.

The backward splits into I (input gradient: the previous stage waits for it) and W
(weight gradient: nobody waits for it). Table 1 of the paper, with T_B the I time:
    1F1B   bubble (p-1)(T_F+T_B+T_W)    memory p M_B
    ZB-H1  bubble (p-1)(T_F+T_B-T_W)    memory p M_B        (1/3 of 1F1B when T_F=T_B=T_W)
    ZB-H2  bubble (p-1)(T_F+T_B-2T_W)   memory (2p-1) M_B   (0 when T_F=T_B=T_W)
    ZB-V   bubble ~0, memory p M_B, two chunks per rank in a V (Sec. 6)
"""

from __future__ import annotations

from collections import defaultdict

from .actions import Action


def _zero_bubble(p, m, limit):
    """The Zero Bubble paper's heuristic (Qi et al. 2024, Sec. 3.1), run on unit costs
    t_f = t_i = t_w: whenever a rank is free it runs, in this priority,
      I  if the gradient from the next stage has arrived (it unblocks the ranks above),
      F  if its input has arrived and fewer than limit(r) micro-batches are in flight,
      W  if some I is still waiting for its W (W depends on nothing remote: bubble filler).
    ZB-H2 lets rank r hold up to 2(p-r)-1 micro-batches, which fills the warm-up."""
    acts = {r: [] for r in range(p)}
    end: dict = {}
    nf, ni, nw, free = [0] * p, [0] * p, [0] * p, [0.0] * p
    stuck: set = set()

    def ready(a, t):
        return a in end and end[a] <= t

    while any(n < m for n in nw):
        r = min((q for q in range(p) if nw[q] < m), key=lambda q: (free[q], q in stuck, q))
        t, a = free[r], None
        if ni[r] < nf[r] and (r == p - 1 or ready(Action(r + 1, "I", ni[r]), t)):
            a, ni[r] = Action(r, "I", ni[r]), ni[r] + 1
        elif nf[r] < m and nf[r] - ni[r] < limit(r) and (r == 0 or ready(Action(r - 1, "F", nf[r]), t)):
            a, nf[r] = Action(r, "F", nf[r]), nf[r] + 1
        elif nw[r] < ni[r]:
            a, nw[r] = Action(r, "W", nw[r]), nw[r] + 1
        if a is None:  # nothing ready: wait for the next thing to finish anywhere
            later = [e for e in end.values() if e > t] + [
                free[q] for q in range(p) if free[q] > t and nw[q] < m
            ]
            if later:
                free[r] = min(later)
            else:
                stuck.add(r)
            continue
        stuck.clear()
        acts[r].append(a)
        end[a] = free[r] = t + 1
    return acts


def _zb_h1(p, m, v):
    """ZB-H1 (Qi et al. 2024, Fig. 3 top): 1F1B's order with each B split into I then W, and
    rank r's W's postponed by r steps, so that the drain, where 1F1B idles waiting for
    gradients, is filled with W's. In-flight memory stays 1F1B's p - r."""
    out = {}
    for r in range(p):
        warmup = min(p - 1 - r, m)
        acts, nw = [Action(r, "F", i) for i in range(warmup)], 0
        for k in range(m):
            if warmup + k < m:
                acts.append(Action(r, "F", warmup + k))
            acts.append(Action(r, "I", k))
            if k >= r:
                acts.append(Action(r, "W", nw))
                nw += 1
        out[r] = acts + [Action(r, "W", i) for i in range(nw, m)]
    return out


def _zb_h2(p, m, v):
    return _zero_bubble(p, m, lambda r: 2 * (p - r) - 1)


def _zbv(p, m, v):
    """ZB-V (Qi et al. 2024, Sec. 6): two chunks per rank in a V (stage r and 2p-1-r), so
    rank 0 holds both the first and the loss stage. Order as in torch.distributed.pipelining's
    ScheduleZBVZeroBubble: warm up chunk 0, then chunk 1, then F0 I0 W0 F1 I1 W1 steps."""
    out = {}
    n = max(2 * p - 1, m)  # plan for enough micro-batches to fill the V, then drop the extra ones
    for r in range(p):
        s0, s1 = r, 2 * p - 1 - r
        cnt = defaultdict(int)
        acts = []

        def add(stage, kind):
            acts.append(Action(stage, kind, cnt[stage, kind]))
            cnt[stage, kind] += 1

        for _ in range(2 * (p - r) - 1):
            add(s0, "F")
        for _ in range(r):
            add(s1, "F"), add(s0, "F")
        for _ in range(p - r):
            add(s1, "F"), add(s1, "I"), add(s1, "W")
        while cnt[s1, "F"] < cnt[s0, "F"] or cnt[s0, "F"] < n:
            if cnt[s0, "F"] < n:
                add(s0, "F")
            add(s0, "I"), add(s0, "W"), add(s1, "F"), add(s1, "I"), add(s1, "W")
        w0, w1 = cnt[s0, "I"], cnt[s1, "I"]
        for _ in range(r):
            add(s0, "I"), add(s1, "I")
        for _ in range(p - r):
            add(s0, "I")
            acts.append(Action(s0, "W", w0))
            w0 += 1
        acts += [Action(s1, "W", i) for i in range(w1, cnt[s1, "I"])]
        acts += [Action(s0, "W", i) for i in range(w0, cnt[s0, "I"])]
        out[r] = [a for a in acts if a.mb < m]
    return out
