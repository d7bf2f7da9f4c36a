import torch.nn.functional as F

from minipar import comm


def sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group):
    """The MLP under sequence parallelism: all-gather(s) -> column -> GELU -> row -> reduce-scatter(s)."""
    h = F.gelu(F.linear(comm.gather_along(x_shard, 1, group), fc_w, fc_b))
    return comm.reduce_scatter_along(F.linear(h, proj_w), 1, group) + proj_b
