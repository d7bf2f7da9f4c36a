def my_1f1b(p, m):
    """{rank: [actions]} of 1F1B for p ranks (stage r on rank r) and m micro-batches."""
    out = {}
    for r in range(p):
        warmup = min(p - 1 - r, m)  # p-1-r forwards before the first backward
        acts = [f"{r}F{i}" for i in range(warmup)]
        for i in range(m - warmup):  # steady state: one forward, one backward
            acts += [f"{r}F{warmup + i}", f"{r}B{i}"]
        acts += [f"{r}B{i}" for i in range(m - warmup, m)]  # drain
        out[r] = acts
    return out
