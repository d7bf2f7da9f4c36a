import torch


def merge(out_a, lse_a, out_b, lse_b):
    """The attention result over keys A and B from the results over A and over B."""
    lse = torch.logaddexp(lse_a, lse_b)  # log(e^a + e^b), with the max subtracted first
    return (torch.exp(lse_a - lse).unsqueeze(-1) * out_a + torch.exp(lse_b - lse).unsqueeze(-1) * out_b), lse
