"""The training loop that drives torch's own implementations (DDP, FSDP2) in the parity tests."""
from minipar import comm
from minipar.dp import local_batch
from minipar.model import SyntheticData, make_optimizer


def train_torch_peer(model, cfg, steps: int, batch: int, seed: int = 0) -> list[float]:
    """The reference loop on `model` as torch wrapped it: AdamW, this rank's shard of each global
    batch; returns each step's loss averaged over the ranks."""
    opt = make_optimizer(model.parameters())
    data, losses = SyntheticData(cfg.vocab, cfg.seq, seed), []
    for step in range(steps):
        x, y = local_batch(data, step, batch)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(comm.all_reduce(loss.detach(), op="avg").item())
    return losses
