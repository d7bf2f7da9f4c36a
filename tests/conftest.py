"""Shared test setup.

One intra-op thread in the test process too: the models here are tiny, the machine has
2 cores shared with forked ranks, and oversubscribed OpenMP threads make everything slower.
"""
import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)
