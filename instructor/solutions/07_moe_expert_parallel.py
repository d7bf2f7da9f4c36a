import torch


def my_topk_route(probs, k, capacity):
    """(index, weights, keep) of top-k routing with `capacity` slots per expert, choice-major."""
    weights, index = probs.topk(k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    E = probs.shape[-1]
    onehot = torch.nn.functional.one_hot(index, E)  # [T, k, E]
    queue = onehot.transpose(0, 1).reshape(-1, E)  # choice-major: all first choices first
    slot = ((queue.cumsum(0) - 1) * queue).sum(-1).view(k, -1).T
    return index, weights, slot < capacity
