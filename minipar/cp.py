"""Context parallelism: cut the *sequence* across ranks, and make attention work anyway.

Everything in a transformer but attention is per token, so a rank holding N/cp of
the N tokens holds N/cp of every activation. Attention needs every key for every
query; two ways to get them (tensors are [batch b, heads h, seq s, head_dim d]):

Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers").
  Rank r keeps its query block Q_r and passes key/value blocks around a ring: at
  step t it holds KV from rank (r - t) mod cp. Each block gives a partial softmax
  (O_t, lse_t) that merges exactly with the log-sum-exp rule (Milakov & Gimelshein
  2018; FlashAttention, Dao et al. 2022):
      lse = log(e^lse_a + e^lse_b),   O = e^(lse_a - lse) O_a + e^(lse_b - lse) O_b
  The next block's send/recv is posted *before* the current block is computed, so
  the transfer hides behind compute. Backward runs the ring again: KV travels with
  its gradient dKV, which comes home after a full circle; nothing gathers the sequence.
  Per rank per layer (KV block = 2·b·h_kv·(N/cp)·d elements):
      forward sends  (cp-1) KV blocks,   backward sends (cp-1) KV + cp dKV blocks.
  Activation memory: Q, K, V, O and lse of N/cp tokens, i.e. 1/cp of one device.

Causal load balancing, "zigzag" (the split of Megatron-LM's context parallelism and of
  ring-flash-attention; Striped Attention, Brandon et al. 2023, balances with a
  round-robin split instead). With a contiguous split, rank r's
  queries see r+1 of the cp key blocks: the last rank does cp times rank 0's work.
  Cut the sequence into 2·cp chunks and give rank r chunks r and 2cp-1-r (one early,
  one late): every rank then computes the same 2cp+1 chunk pairs per causal pass.

DeepSpeed-Ulysses (Jacobs et al. 2023) swaps sequence shards for head shards with all-to-alls:
  `minipar/ulysses.py`; its functions are re-exported here.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from . import comm, mappings, trace
from .collectives import ring_neighbours
from .model import GPT, SyntheticData, make_optimizer
from .result import TrainResult
from .runtime import device
from .ulysses import ulysses_attention, ulysses_bytes
from .validation import Problems

__all__ = [
    "LAYOUTS",
    "chunk_ids",
    "shard_sequence",
    "unshard_sequence",
    "sequence_positions",
    "attend",
    "attend_backward",
    "attention_fn",
    "merge_attention",
    "visible_pairs",
    "ring_attention",
    "ulysses_attention",
    "ring_bytes",
    "ulysses_bytes",
    "ring_flops",
    "check_config",
    "parallelize_attention",
    "local_batch",
    "train_rank",
]

LAYOUTS = ("zigzag", "contiguous")


# ----------------------------------------------------------------------------- sharding the sequence
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunk_ids(rank: int, size: int, layout: str = "zigzag") -> tuple[int, ...]:
    """The sequence chunks `rank` holds: zigzag cuts 2·size chunks and gives rank r chunks
    r and 2·size-1-r; contiguous cuts `size` chunks and gives rank r chunk r."""
    _check_layout(layout)
    return (rank, 2 * size - 1 - rank) if layout == "zigzag" else (rank,)


def shard_sequence(
    x: torch.Tensor, rank: int, size: int, layout: str = "zigzag", dim: int = 2
) -> torch.Tensor:
    """This rank's slice of the sequence dimension `dim` of `x`."""
    n = len(chunk_ids(0, size, layout)) * size
    if x.shape[dim] % n:
        raise ValueError(
            f"a {layout} split over {size} ranks cuts the sequence into {n} equal chunks, but its "
            f"length is {x.shape[dim]}; use a sequence length divisible by {n}"
        )
    chunks = x.chunk(n, dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, size, layout)], dim)


def unshard_sequence(
    local: torch.Tensor, size: int, layout: str = "zigzag", dim: int = 2, group=None
) -> torch.Tensor:
    """Gather every rank's slice and put the chunks back in sequence order (an all-gather;
    its backward keeps this rank's slice of the gradient)."""
    if comm.size(group) != size:
        raise ValueError(
            f"unshard_sequence(size={size}) on a group of {comm.size(group)} ranks; pass the group size"
        )
    gathered = mappings.gather_along(local, dim, group, grad="split")  # rank 0's chunks, rank 1's chunks, ...
    held = [c for r in range(size) for c in chunk_ids(r, size, layout)]
    pieces = gathered.chunk(len(held), dim)
    return torch.cat([pieces[held.index(c)] for c in range(len(held))], dim)


def sequence_positions(seq: int, rank: int, size: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions of this rank's tokens (for the position embedding and the causal mask)."""
    return shard_sequence(torch.arange(seq), rank, size, layout, dim=0)


# ----------------------------------------------------------------------------- one block of attention
def attend(q, k, v, mask=None):
    """Softmax attention of queries over one block of keys, in fp32, with its log-sum-exp:
        S = QKᵀ/√d,   lse_i = log Σ_j exp S_ij,   O = exp(S - lse) V.
    (Plain matmuls: SDPA does not return the lse that merging needs.)"""
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v.float(), lse


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Merge two partial softmax results over disjoint key sets into the result over their union:
        lse = log(e^lse_a + e^lse_b),   O = e^(lse_a - lse) O_a + e^(lse_b - lse) O_b.
    logaddexp subtracts the larger lse first, so large scores never overflow fp32."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse).unsqueeze(-1) * out_a + torch.exp(lse_b - lse).unsqueeze(-1) * out_b, lse


def attend_backward(q, k, v, mask, dout, lse, delta):
    """Gradients of one block, given the *final* lse and D = rowsum(dO ∘ O) (FlashAttention-2, Alg. 2):
        P = exp(S - lse),  dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ - D),  dQ = dS K/√d,  dK = dSᵀ Q/√d.
    With the final lse, P is the block's slice of the full softmax, so block gradients just add up."""
    scale = 1 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    ds = p * (dout @ v.transpose(-2, -1) - delta.unsqueeze(-1))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ dout


def visible_pairs(q_ids, k_ids, causal: bool, c: int, device):
    """(i, j, mask) for each (query chunk i, key chunk j) with work to do. Causally, chunk a sees
    chunk b whole if a > b, through a lower-triangular mask if a == b, and not at all if a < b."""
    tril = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    for i, a in enumerate(q_ids):
        for j, b in enumerate(k_ids):
            if not causal or a > b:
                yield i, j, None
            elif a == b:
                yield i, j, tril


def _expand(t, g):  # grouped-query attention: each KV head serves g query heads
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def _fold(t, g):  # the gradient of _expand: sum over the g query heads sharing a KV head
    return t if g == 1 else t.unflatten(1, (-1, g)).sum(2)


# ----------------------------------------------------------------------------- ring attention
def _pass(t, right, left, group):
    """Post the ring step: send `t` right, receive the left neighbour's into a new buffer."""
    buf = torch.empty_like(t)
    return buf, comm.batch_p2p(sends=[(t, right)], recvs=[(buf, left)], group=group)


def _wait(works):
    for w in works:
        w.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, layout, group):
        me, n, left, right = ring_neighbours(group)
        m, g = len(chunk_ids(0, n, layout)), q.shape[1] // k.shape[1]
        c = q.shape[2] // m
        qs = q.chunk(m, 2)
        out, lse = [None] * m, [None] * m
        kv = torch.stack([k, v])  # one message per step
        for step in range(n):
            src = (me - step) % n  # whose KV block we hold now
            if step < n - 1:  # overlap: the next block travels while we compute
                incoming, works = _pass(kv, right, left, group)
            pairs = list(
                visible_pairs(chunk_ids(me, n, layout), chunk_ids(src, n, layout), causal, c, q.device)
            )
            ks, vs = kv[0].chunk(m, 2), kv[1].chunk(m, 2)
            with trace.span(f"F{step}", flops=len(pairs) * 4 * q.shape[0] * q.shape[1] * c * c * q.shape[3]):
                for i, j, mask in pairs:
                    o, s = attend(qs[i], _expand(ks[j], g), _expand(vs[j], g), mask)
                    out[i], lse[i] = (o, s) if out[i] is None else merge_attention(out[i], lse[i], o, s)
            if step < n - 1:
                _wait(works)
                kv = incoming
        out, lse = torch.cat(out, 2), torch.cat(lse, 2)
        ctx.save_for_backward(q, k, v, out, lse)  # all of N/cp tokens: memory falls as 1/cp
        ctx.cfg = (causal, layout, group)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, layout, group = ctx.cfg
        me, n, left, right = ring_neighbours(group)
        m, g = len(chunk_ids(0, n, layout)), q.shape[1] // k.shape[1]
        c = q.shape[2] // m
        dout = dout.float()
        delta = (dout * out).sum(-1)  # D_i = Σ_d dO_id O_id, shared by all blocks
        qs, dos, lses, deltas = (t.chunk(m, 2) for t in (q.float(), dout, lse, delta))
        dq = [torch.zeros_like(t) for t in qs]
        kv = torch.stack([k, v]).float()
        dkv_in = dkv_works = None  # the block's gradient arriving from the left
        for step in range(n):
            src = (me - step) % n
            if step < n - 1:
                incoming, works = _pass(kv, right, left, group)
            pairs = list(
                visible_pairs(chunk_ids(me, n, layout), chunk_ids(src, n, layout), causal, c, q.device)
            )
            ks, vs = kv[0].chunk(m, 2), kv[1].chunk(m, 2)
            dks, dvs = [torch.zeros_like(t) for t in ks], [torch.zeros_like(t) for t in vs]
            with trace.span(f"B{step}", flops=len(pairs) * 10 * q.shape[0] * q.shape[1] * c * c * q.shape[3]):
                for i, j, mask in pairs:
                    dqi, dkj, dvj = attend_backward(
                        qs[i], _expand(ks[j], g), _expand(vs[j], g), mask, dos[i], lses[i], deltas[i]
                    )
                    dq[i] += dqi
                    dks[j] += _fold(dkj, g)
                    dvs[j] += _fold(dvj, g)
            dkv = torch.stack([torch.cat(dks, 2), torch.cat(dvs, 2)])
            if step > 0:  # this block's gradient so far, from the last holder
                _wait(dkv_works)
                dkv += dkv_in
            if n > 1:  # pass it on with its block; after n passes it is home
                dkv_in, dkv_works = _pass(dkv, right, left, group)
            if step < n - 1:
                _wait(works)
                kv = incoming
        if n > 1:
            _wait(dkv_works)
            dkv = dkv_in
        return torch.cat(dq, 2).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q, k, v, causal: bool = True, layout: str = "zigzag", group=None) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, passing KV blocks around the ring.
    q, k, v: local shards [b, h, N/cp, d] in `layout` (see `shard_sequence`); k, v may have fewer
    (grouped-query) heads. Returns the local output shard; differentiable."""
    _check_layout(layout)
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{q.shape[1]} query heads cannot share {k.shape[1]} KV heads; use a divisor of {q.shape[1]}"
        )
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(
            f"a zigzag shard holds two equal chunks, but has {q.shape[2]} tokens; "
            "cut the inputs with shard_sequence"
        )
    return _RingAttention.apply(q, k, v, causal, layout, group)


# ----------------------------------------------------------------------------- formulas
def ring_bytes(b, h_kv, seq, d, cp, elem=4) -> dict:
    """Bytes each rank sends per layer: forward (cp-1) KV blocks, backward (cp-1) KV + cp dKV."""
    block = 2 * b * h_kv * (seq // cp) * d * elem
    return {"forward": (cp - 1) * block, "backward": (2 * cp - 1) * block if cp > 1 else 0}


def ring_flops(b, h, seq, d, cp, rank, layout="zigzag", causal=True) -> int:
    """Forward attention FLOPs `rank` computes: 4·b·h·c²·d per (query chunk, key chunk) pair it visits
    (diagonal pairs are computed whole, then masked). Causally that is
        contiguous (c = N/cp):   (r+1)·4·b·h·c²·d   -> the last rank does cp x rank 0's work
        zigzag   (c = N/2cp):   (2cp+1)·4·b·h·c²·d on every rank."""
    m = len(chunk_ids(0, cp, layout))
    c = seq // (m * cp)
    mine = chunk_ids(rank, cp, layout)
    pairs = sum(
        len(list(visible_pairs(mine, chunk_ids(src, cp, layout), causal, 1, "cpu"))) for src in range(cp)
    )
    return pairs * 4 * b * h * c * c * d


# ----------------------------------------------------------------------------- a GPT with context parallelism
def check_config(
    cfg, cp: int, method: str = "ring", layout: str = "zigzag", tp: int = 1, problems: Problems | None = None
) -> None:
    """The rules of context parallelism over cp ranks (tp: the tensor-parallel ranks that already
    split the heads), each with its reason; raises a ConfigError listing every problem, or adds
    them to `problems` (as `compose.check` does)."""
    p = Problems() if problems is None else problems
    ok = p.choice("cp_method", method, ("ring", "ulysses")) & p.choice("cp_layout", layout, LAYOUTS)
    if ok and p.integer("cp", cp, low=1) and cp > 1:
        if method == "ulysses" and layout != "contiguous":
            p.add("Ulysses gathers the whole sequence per head, so it needs layout='contiguous'")
        chunks = len(chunk_ids(0, cp, layout)) * cp  # zigzag: 2 chunks per rank
        p.divides("cp", chunks, "seq", cfg.seq, f"the {layout} layout cuts it into {chunks} equal chunks")
        if method == "ulysses" and cfg.heads % tp == 0 and (cfg.heads // tp) % cp:
            p.add(
                f"Ulysses' all-to-all gives each cp rank whole heads: the {cfg.heads // tp} heads per tp rank "
                f"must be divisible by {p.name('cp')}={cp}; lower cp or tp, or use {p.name('cp_method')} ring"
            )
    if problems is None:
        p.raise_if_any("context parallelism cannot run this configuration")


def attention_fn(method: str = "ring", layout: str = "zigzag", group=None):
    """The causal `attn_fn(q, k, v)` a block calls: ring or Ulysses attention over `group`."""
    if method == "ring":
        return partial(ring_attention, causal=True, layout=layout, group=group)
    return partial(ulysses_attention, causal=True, group=group)


def parallelize_attention(model, method: str = "ring", layout: str = "zigzag", group=None):
    """Swap every block's attention for ring or Ulysses attention over `group` (in place)."""
    fn = attention_fn(method, layout, group)
    for blk in model.blocks:
        blk.attn.attn_fn = fn
    return model


def local_batch(x, y, rank: int, size: int, layout: str = "zigzag"):
    """This rank's (inputs, targets, positions): its slice of the sequence and where it sits."""
    pos = sequence_positions(x.shape[1], rank, size, layout)
    return shard_sequence(x, rank, size, layout, 1), shard_sequence(y, rank, size, layout, 1), pos


def train_rank(
    cfg,
    steps: int = 3,
    batch_size: int = 4,
    seed: int = 0,
    method: str = "ring",
    layout: str = "zigzag",
    group=None,
    **optim,
) -> TrainResult:
    """Run inside `launch`: the reference loop with the sequence split over `group`.

    Every rank holds the same tokens count, so the full-sequence mean loss is the mean of the
    ranks' local means: each rank backpropagates local/cp, and parameter gradients (partial sums,
    as in data parallelism) are all-reduced. Returns {"losses", "first_grads" and "grads" (of the
    first and the last step), "params" (final)}. `optim`: overrides of `make_optimizer` (kind="sgd")."""
    n, r = comm.size(group), comm.local_rank(group)
    check_config(cfg, n, method, layout)
    torch.manual_seed(seed)
    model = parallelize_attention(GPT(cfg, seed).to(device()), method, layout, group)
    data, opt = SyntheticData(cfg.vocab, cfg.seq, seed), make_optimizer(model.parameters(), **optim)
    losses, grads, first = [], {}, {}
    for step in range(steps):
        x, y, pos = (t.to(device()) for t in local_batch(*data.batch(step, batch_size), r, n, layout))
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y, pos=pos)
        (loss / n).backward()
        for p in model.parameters():
            comm.all_reduce(p.grad, group=group)
        losses.append(comm.all_reduce(loss.detach().clone(), "avg", group=group).item())
        grads = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()}
        first = first or grads
        opt.step()
    return TrainResult(
        losses,
        first_grads=first,
        grads=grads,
        params={k: p.detach().cpu().clone() for k, p in model.named_parameters()},
    )
