import torch

from minipar import comm


def shard_gradient(flat_grad):
    """This rank's shard of the average of every rank's flat gradient (padded to a multiple of N)."""
    n = comm.size()
    shard = -(-flat_grad.numel() // n)
    padded = torch.cat([flat_grad, flat_grad.new_zeros(shard * n - flat_grad.numel())])
    return comm.reduce_scatter(padded, op="avg")
