import torch.nn.functional as F

from minipar import mappings


def sp_mlp(x_shard, fc_w, fc_b, proj_w, proj_b, group):
    """The MLP under sequence parallelism: all-gather(s) -> column -> GELU -> row -> reduce-scatter(s)."""
    h = F.gelu(F.linear(mappings.gather_along(x_shard, 1, group), fc_w, fc_b))
    return mappings.reduce_scatter_along(F.linear(h, proj_w), 1, group) + proj_b
