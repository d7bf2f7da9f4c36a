"""Shared test setup.

One intra-op thread in the test process too: the models here are tiny, the machine has
2 cores shared with forked ranks, and oversubscribed OpenMP threads make everything slower.
"""

import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)

# Modules whose tests compare a strategy with the single-device reference (or torch's own).
PARITY = {
    "test_train.py",
    "test_dp.py",
    "test_zero.py",
    "test_tp.py",
    "test_cp.py",
    "test_moe.py",
    "test_pp_runtime.py",
    "test_pp_torch.py",
    "test_pp_pipedream.py",
    "test_serve.py",
    "test_fp8.py",
    "test_checkpoint.py",
    "test_foundation.py",
    "test_collectives.py",
    "test_nvme.py",
}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        if name.endswith(".ipynb"):
            item.add_marker("notebook")
        elif name in PARITY:
            item.add_marker("parity")
