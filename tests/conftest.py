"""Shared test setup.

One intra-op thread in the test process too: the models here are tiny, the machine has
2 cores shared with forked ranks, and oversubscribed OpenMP threads make everything slower.
"""

import os

import matplotlib
import pytest
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


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by these markers
def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        if name.endswith(".ipynb"):
            item.add_marker("notebook")
        elif name in PARITY:
            item.add_marker("parity")


class _RunOnce:
    """The browser test runs all of each widget notebook in JupyterLab and fails on any traceback,
    which is what nbval checks. Where it will run (still selected after `-m`/`-k`, and chromium and
    playwright are here, or CI requires them), nbval does not execute those notebooks a second
    time: about a minute of the suite."""

    @pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected what they will
    def pytest_collection_modifyitems(self, config, items):
        browser = {
            item.callspec.params["name"]
            for item in items
            if item.path.name == "test_browser.py" and hasattr(item, "callspec")
            if item.module.unavailable() is None or os.environ.get("MINIPAR_REQUIRE_BROWSER")
        }
        twice = [
            i
            for i in items
            if i.path.suffix == ".ipynb" and i.path.parent.name == "notebooks" and i.path.stem in browser
        ]
        if twice:
            config.hook.pytest_deselected(items=twice)
            items[:] = [i for i in items if i not in twice]


def pytest_configure(config):
    config.pluginmanager.register(_RunOnce(), "minipar-run-once")
