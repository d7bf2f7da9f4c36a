"""Our executor against torch.distributed.pipelining on the schedules both have: same stages,
same data, same optimizer; losses and gradients agree."""

import pytest
from _parity import assert_grads_match

from minipar import launch
from minipar.bench.pp import PEERS, _both
from minipar.model import GPTConfig

CFG = GPTConfig(vocab=64, seq=16, layers=8, heads=4, hidden=32)
STEPS = 2


@pytest.fixture(scope="module")
def runs():
    return launch(_both, 4, list(PEERS), CFG, STEPS, 8, 8, 1, timeout=180)


@pytest.mark.parametrize("name", list(PEERS))
def test_matches_torch_pipelining(runs, name):
    ours = [sum(r[name]["ours"]["losses"][i] for r in runs) for i in range(STEPS)]
    theirs = [sum(r[name]["torch"]["losses"][i] for r in runs) for i in range(STEPS)]
    assert ours == pytest.approx(theirs, abs=1e-5)
    for r in runs:  # the last step's gradients, relative to each tensor's scale (tests/_parity.py)
        assert_grads_match(r[name]["ours"]["grads"], r[name]["torch"]["grads"], what=name)
