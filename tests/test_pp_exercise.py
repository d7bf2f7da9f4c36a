"""The 1F1B exercise (notebook 05): actions as strings or Actions, and the classic wrong schedules."""

from test_exercises import solution

from minipar.exercises import check
from minipar.pp import Action


def gpipe(p, m):  # right makespan, but holds all m micro-batches
    return {r: [f"{r}F{i}" for i in range(m)] + [f"{r}B{i}" for i in range(m)] for r in range(p)}


def naive(p, m):  # valid, but no pipelining at all: rank r waits for the whole batch before going
    return {r: [a for i in range(m) for a in (f"{r}F{i}", f"{r}B{i}")] for r in range(p)}


def one_warmup_too_many(p, m):
    out = {}
    for r in range(p):
        w = min(p - r, m)
        acts = [f"{r}F{i}" for i in range(w)]
        for i in range(m - w):
            acts += [f"{r}F{w + i}", f"{r}B{i}"]
        out[r] = acts + [f"{r}B{i}" for i in range(m - w, m)]
    return out


def backward_first(p, m):  # B before its F: rejected by the validator
    return {
        r: [Action(r, "B", i) for i in range(m)] + [Action(r, "F", i) for i in range(m)] for r in range(p)
    }


def test_checker_accepts_strings_and_actions():
    ref = solution("pp_1f1b")
    assert check("pp_1f1b", ref)
    assert check(
        "pp_1f1b",
        lambda p, m: {
            r: [Action(int(a[0]), a[1], int(a[2:])) for a in acts] for r, acts in ref(p, m).items()
        },
    )


def test_checker_rejects_wrong_answers():
    for wrong, says in [
        (gpipe, "holds"),
        (naive, "makespan"),
        (one_warmup_too_many, "holds"),
        (backward_first, "not a valid schedule"),
        (lambda p, m: [], "expected a dict"),
    ]:
        v = check("pp_1f1b", wrong, first_failure=True)
        assert not v and says in v.message, (wrong.__name__, v.message)
    assert not check("pp_1f1b", None)
