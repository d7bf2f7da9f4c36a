"""The training loop that drives torch's own implementations (DDP, FSDP2) in the parity tests."""

import torch

from minipar import comm
from minipar.dp import local_batch
from minipar.model import SyntheticData, make_optimizer


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameter or gradient) gathered to full shape; a tensor as is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train_torch_peer(
    model, cfg, steps: int, batch: int, seed: int = 0, grads: dict | None = None, **optim
) -> list[float]:
    """The reference loop on `model` as torch wrapped it: AdamW (or `optim`'s overrides of
    `make_optimizer`), this rank's shard of each global batch; returns each step's loss averaged over
    the ranks. `grads`, if given, receives the first step's gradients at full shape."""
    opt = make_optimizer(model.parameters(), **optim)
    data, losses = SyntheticData(cfg.vocab, cfg.seq, seed), []
    for step in range(steps):
        x, y = local_batch(data, step, batch)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        if step == 0 and grads is not None:
            grads.update({_name(n): full_tensor(p.grad) for n, p in model.named_parameters()})
        opt.step()
        losses.append(comm.all_reduce(loss.detach(), op="avg").item())
    return losses


def _name(n: str) -> str:
    """The reference's name of a parameter: without DistributedDataParallel's "module." prefix."""
    return n.removeprefix("module.")


def full_params(model) -> dict:
    return {_name(n): full_tensor(p) for n, p in model.named_parameters()}
