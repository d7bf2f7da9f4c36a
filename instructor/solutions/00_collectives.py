import torch

from minipar import comm
from minipar.collectives import ring_neighbours


def ring_all_gather(x, group=None):
    """Every rank's x, concatenated along dim 0, in N-1 ring steps."""
    r, n, left, right = ring_neighbours(group)
    blocks = [None] * n
    blocks[r] = x
    for s in range(n - 1):  # step s: forward the block received at step s-1
        buf = torch.empty_like(x)
        for h in comm.batch_p2p(sends=[(blocks[(r - s) % n], right)], recvs=[(buf, left)], group=group):
            h.wait()
        blocks[(r - s - 1) % n] = buf
    return torch.cat(blocks)
