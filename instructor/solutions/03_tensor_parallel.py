import torch.nn.functional as F

from minipar import mappings


def parallel_mlp(x, fc_w, fc_b, proj_w, proj_b, group):
    """Megatron's MLP from its shards: f -> column-parallel fc -> GELU -> row-parallel proj -> g, bias once."""
    h = F.gelu(F.linear(mappings.f(x, group), fc_w, fc_b))
    return mappings.g(F.linear(h, proj_w), group) + proj_b
