"""Expert parallelism: the E experts are sharded over the `ep` axis, tokens travel to them.

Rank r of an ep group holds experts [r*E/ep, (r+1)*E/ep) and its own batch shard; the
router, attention and embeddings are replicated (data parallel). One MoE layer
(GShard Sec. 3.2; Megatron-LM's all-to-all token dispatcher):

    1. route locally, drop over-capacity choices (capacity per rank's group of tokens)
    2. permute: sort the kept (token, choice) rows by expert, hence by destination rank
    3. exchange split sizes: all-gather every rank's rows-per-expert table [ep, E]
    4. all-to-all (uneven splits): rows go to the rank holding their expert
    5. local experts run on their contiguous rows
    6. inverse all-to-all: results return along the same splits
    7. un-permute and combine: y_t = sum over kept choices of g * expert output

Communication per MoE layer and step, per rank, with T local tokens, k choices, hidden h:
each all-to-all sends T*k*h values, of which a fraction (ep-1)/ep leaves the rank when
routing is uniform (GShard Sec. 3.2, Switch Sec. 2.2 / Fig. 3):

    wire bytes per all-to-all  ~  T * k * h * (ep-1)/ep * bytes_per_value

and there are four: dispatch and combine forward, and their transposes in backward.

Gradients: dense parameters are averaged over all dp*ep data shards. An expert's
gradient already sums the contributions of its whole ep group (they came back through
the all-to-all's backward), so it is summed over the `dp` axis only (the ranks holding
the same experts) and divided by dp*ep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import comm, mappings, trace
from .mesh import Mesh
from .model import GPT, GPTConfig, SyntheticData, make_optimizer
from .moe import check_config, combine, moe_layers, permute, skew_router, update_bias
from .result import TrainResult
from .runtime import device, launch
from .validation import ConfigError

__all__ = [
    "dispatch_combine",
    "AllToAllDispatcher",
    "a2a_formula",
    "expert_parallel",
    "sync_grads",
    "train_moe",
    "MoERun",
    "check_ep",
    "run_ep",
]


def a2a_formula(tokens: int, top_k: int, hidden: int, ep: int, bytes_per_value: int = 4) -> float:
    """Bytes one rank sends off-rank in one all-to-all under uniform routing: T*k*h*(ep-1)/ep values."""
    return tokens * top_k * hidden * (ep - 1) / ep * bytes_per_value


def dispatch_combine(x, index, weights, keep, experts, num_experts, ep_size=1, ep_rank=0, group=None):
    """Steps 2-7 above for x [T, h]; `experts` holds this rank's E/ep experts in order.
    With ep_size 1 the exchanges are skipped and the same code is the single-device layer.
    Returns (y [T, h], split sizes for the stats)."""
    tok, choice, expert, counts = permute(index, keep, num_experts)  # 2. rows sorted by expert
    n_local = num_experts // ep_size
    rows = x[tok]
    if ep_size > 1:
        table = comm.all_gather(counts[None], dim=0, group=group)  # 3. [source rank, expert]
        recv = table[:, ep_rank * n_local : (ep_rank + 1) * n_local]  # rows each source sends to my experts
        send_splits, recv_splits = counts.view(ep_size, n_local).sum(1).tolist(), recv.sum(1).tolist()
        rows = mappings.all_to_all_autograd(rows, recv_splits, send_splits, group)  # 4. dispatch
        # arrivals are ordered (source, expert); regroup them by local expert
        local = torch.arange(n_local, device=x.device).repeat(ep_size).repeat_interleave(recv.flatten())
        by_expert = torch.argsort(local, stable=True)
        rows, per_expert = rows[by_expert], recv.sum(0)
    else:
        table, per_expert = counts[None], counts
        send_splits = recv_splits = [int(counts.sum())]
    out = torch.cat([e(chunk) for e, chunk in zip(experts.values(), rows.split(per_expert.tolist()))])  # 5.
    if ep_size > 1:
        out = out[torch.argsort(by_expert)]  # back to (source, expert) order
        out = mappings.all_to_all_autograd(out, send_splits, recv_splits, group)  # 6. combine
    y = combine(x, tok, choice, out, weights)  # 7. un-permute
    return y, dict(table=table.detach().cpu(), send_splits=send_splits, recv_splits=recv_splits)


class AllToAllDispatcher:
    """The token dispatcher `expert_parallel` installs in every MoE layer (Megatron-Core's
    MoEAlltoAllTokenDispatcher): the layer routes, this sends the rows to their experts' ranks."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def __call__(self, x, index, weights, keep, experts, num_experts):
        return dispatch_combine(
            x, index, weights, keep, experts, num_experts, self.size, self.rank, self.group
        )


def check_ep(cfg: GPTConfig, ep: int, dp: int = 1, batch_size: int = 8) -> None:
    """Every check that can fail before launch, with the fix in the message."""
    check_config(cfg, ep)
    shards = dp * ep
    if dp < 1 or batch_size % shards:
        raise ValueError(
            f"batch_size={batch_size} must split evenly over dp*ep={shards} data shards (dp={dp} >= 1)"
        )
    if cfg.moe_groups % shards:
        raise ValueError(
            f"moe_groups={cfg.moe_groups} with {shards} data shards: capacity and the aux loss are "
            f"per group of tokens (GShard), and each rank's tokens are whole groups; set "
            f"GPTConfig(moe_groups={shards}) (or a multiple) and compare with a single-device run "
            "of the same config"
        )


def expert_parallel(model: GPT, mesh: Mesh, groups: int | None = None) -> GPT:
    """Keep only this rank's experts in every MoE layer and install the all-to-all dispatcher
    over the ep axis. The other axes need nothing here: experts are replicated over dp, cp and
    tp, and each rank dispatches its own tokens (for cp and SP, see `moe.split_tokens`).
    `groups`: token groups per forward call; by default this rank's share of cfg.moe_groups,
    which must then split evenly over the dp*ep data shards (`check_ep`)."""
    ep, shards = mesh.size("ep"), mesh.size("dp") * mesh.size("ep")
    for m in moe_layers(model):
        if groups is None and m.cfg.moe_groups % shards:
            raise ConfigError(
                [
                    f"moe_groups={m.cfg.moe_groups} must be a multiple of the dp*ep={shards} data "
                    "shards (each rank's tokens are whole groups), or pass groups="
                ]
            )
        check_config(m.cfg, ep)
        n_local, me = m.num_experts // ep, mesh.index("ep")
        for name in list(m.experts):
            if int(name) // n_local != me:
                del m.experts[name]
        m.dispatcher = AllToAllDispatcher("ep", ep, me)
        m.groups = m.cfg.moe_groups // shards if groups is None else groups
    return model


def sync_grads(model: GPT, mesh: Mesh) -> None:
    shards = mesh.size("dp") * mesh.size("ep")
    named = list(model.named_parameters())
    comm.all_reduce_grads(
        [p for n, p in named if ".experts." not in n], None, 1.0 / shards
    )  # every data shard
    comm.all_reduce_grads([p for n, p in named if ".experts." in n], "dp", 1.0 / shards)  # same experts only


@dataclass
class MoERun(TrainResult):
    """`TrainResult` (first-step and last-step gradients, parameters: this rank's experts only
    under EP) plus the router's records."""

    aux_losses: list = field(default_factory=list)  # per step, the aux + z-loss part of `losses`
    logits: torch.Tensor | None = None  # last step, this rank's batch shard
    load: list = field(
        default_factory=list
    )  # per step: [moe layers, E] choices routed to each expert, global
    dropped: list = field(default_factory=list)  # per step: fraction of (token, choice) pairs dropped, global
    keep: list = field(default_factory=list)  # last step: [T_local, k] kept mask per MoE layer
    bias: list = field(default_factory=list)  # final expert bias per MoE layer
    stats: list = field(default_factory=list)  # last step: each MoE layer's stats on this rank
    events: list = field(default_factory=list)  # this rank's trace events

    def imbalance(self, window: int = 1) -> list[float]:
        """max/mean expert load per step, worst MoE layer (1.0 is perfectly balanced), of the
        load summed over the last `window` steps: window > 1 averages out batch-to-batch noise."""
        out = []
        for i in range(len(self.load)):
            l = torch.stack(self.load[max(0, i - window + 1) : i + 1]).double().sum(0)
            out.append((l.max(-1).values / l.mean(-1)).max().item())
        return out


def train_moe(
    cfg: GPTConfig,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    gamma: float = 0.0,
    skew: float = 0.0,
    mesh: Mesh | None = None,
    progress: bool = False,
    **optim,
) -> MoERun:
    """`train_reference`'s loop plus the MoE bookkeeping: aux-loss-free bias updates (gamma > 0)
    and load/drop statistics. mesh=None: single device. With a Mesh(dp=, ep=) inside `launch`:
    expert parallel on this rank's batch shard (call through `run_ep`)."""
    torch.manual_seed(seed)
    model = GPT(cfg, seed)
    if skew:
        skew_router(model, skew)
    shards, shard = 1, 0
    if mesh is not None:
        expert_parallel(model, mesh)
        shards, shard = (
            mesh.size("dp") * mesh.size("ep"),
            mesh.index("dp") * mesh.size("ep") + mesh.index("ep"),
        )
    model.to(device())
    data = SyntheticData(cfg.vocab, cfg.seq, seed)
    opt = make_optimizer(model.parameters(), **optim)
    losses, aux, load, dropped, grads, first = [], [], [], [], {}, {}
    for step in tqdm(range(steps), disable=not progress, desc="moe"):
        x, y = (t.chunk(shards)[shard].to(device()) for t in data.batch(step, batch_size))
        opt.zero_grad(set_to_none=True)
        with trace.span("F"):
            logits, loss = model(x, y)
        with trace.span("B"):
            loss.backward()
        if mesh is not None:
            sync_grads(model, mesh)
        if step in (0, steps - 1):
            grads = {
                n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None
            }
            first = first or grads
        with trace.span("opt"):
            opt.step()
        step_loss, step_aux, step_load, step_dropped = _bookkeeping(model, loss, mesh is not None)
        losses.append(step_loss / shards)
        aux.append(step_aux / shards)
        load.append(step_load)
        dropped.append(step_dropped)
        update_bias(model, gamma, loads=list(step_load))  # after the step, as DeepSeek-V3 does
    layers = moe_layers(model)
    return MoERun(
        losses,
        first_grads=first,
        grads=grads,
        params={n: p.detach().cpu().clone() for n, p in model.named_parameters()},
        aux_losses=aux,
        logits=logits.detach().cpu(),
        load=load,
        dropped=dropped,
        keep=[m.stats["keep"] for m in layers],
        bias=[m.expert_bias.cpu().clone() for m in layers],
        stats=[{k: v for k, v in m.stats.items() if k != "keep"} for m in layers],
        events=trace.events(),
    )


def _bookkeeping(model, loss, distributed):
    """-> (loss, aux loss, [layers, E] routed load, dropped fraction), summed over the data shards
    in one all-reduce. Untraced: the trace keeps only the model's own traffic."""
    layers = moe_layers(model)
    per_layer = [
        torch.cat(
            [m.step_load.double(), torch.tensor([m.stats["dropped"], m.stats["choices"]], dtype=torch.double)]
        )
        for m in layers
    ]
    scalars = torch.stack([loss.detach(), model.aux_loss().to(loss)]).double().cpu()
    book = torch.cat([torch.stack(per_layer).flatten(), scalars]).to(device())
    if distributed:
        with trace.enabled(False):
            comm.all_reduce(book)
    book = book.cpu()
    table = book[:-2].view(len(layers), -1)
    return (
        book[-2].item(),
        book[-1].item(),
        table[:, :-2].long(),
        (table[:, -2].sum() / table[:, -1].sum()).item(),
    )


def _ep_worker(cfg, ep, dp, kwargs):
    return train_moe(cfg, mesh=Mesh(dp=dp, ep=ep), **kwargs)


def run_ep(
    cfg: GPTConfig,
    ep: int,
    dp: int = 1,
    steps: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    gamma: float = 0.0,
    skew: float = 0.0,
    timeout: float = 120,
    **optim,
) -> list[MoERun]:
    """Validate, then train on dp*ep simulated ranks laid out as Mesh(dp=dp, ep=ep); one MoERun per rank."""
    check_ep(cfg, ep, dp, batch_size)
    kw = dict(steps=steps, batch_size=batch_size, seed=seed, gamma=gamma, skew=skew, **optim)
    return launch(_ep_worker, dp * ep, cfg, ep, dp, kw, timeout=timeout)
