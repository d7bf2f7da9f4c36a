from minipar.exercises import check
from minipar.pp import Action, build_schedule


def reference(p, m):
    return build_schedule("1f1b", p, m).actions


def gpipe(p, m):       # right makespan, but holds all m micro-batches
    return build_schedule("gpipe", p, m).actions


def naive(p, m):       # valid, but no pipelining at all
    return build_schedule("naive", p, m).actions


def one_warmup_too_many(p, m):
    out = {}
    for r in range(p):
        w = min(p - r, m)
        acts = [f"{r}F{i}" for i in range(w)]
        for i in range(m - w):
            acts += [f"{r}F{w + i}", f"{r}B{i}"]
        out[r] = acts + [f"{r}B{i}" for i in range(m - w, m)]
    return out


def backward_first(p, m):   # B before its F: rejected by the validator
    return {r: [Action(r, "B", i) for i in range(m)] + [Action(r, "F", i) for i in range(m)] for r in range(p)}


def test_checker_accepts_reference_and_strings():
    assert check("pp_1f1b", reference)
    assert check("pp_1f1b", lambda p, m: {r: [str(a) for a in acts] for r, acts in reference(p, m).items()})


def test_checker_rejects_wrong_answers():
    for wrong, says in [(gpipe, "holds"), (naive, "makespan"), (one_warmup_too_many, "holds"),
                        (backward_first, "not a valid schedule")]:
        v = check("pp_1f1b", wrong)
        assert not v and says in v.message, (wrong.__name__, v.message)
    assert not check("pp_1f1b", None)
