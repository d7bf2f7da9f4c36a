"""Distributed checkpoints: each rank saves only its own shards, and any layout can load them.

A checkpoint is a directory:

    step_000010/
        metadata.json      step, config, the layout that saved it, and each rank file's size + sha256
        rank_00000.pt      {key: (tensor piece, Piece)} for every shard this rank holds
        ...
    latest                 the name of the newest complete checkpoint

Every tensor piece says where it sits in the *full* (unsharded) tensor, so a reader with a
different layout rebuilds the full tensor and keeps its own slice. Two kinds of piece cover
every strategy in minipar:

* `box`: a block of the full tensor (tensor parallelism: rows or columns of a weight);
* `flat`: a range of the flattened full tensor (ZeRO's flat shards cut across parameters).

This is the idea of torch.distributed.checkpoint (DCP), kept small: we read whole files rather
than only the overlapping chunks, which is fine at the sizes minipar trains.

Atomicity: ranks write into `step_N.partial/`, each file through a temporary name and
`os.replace`; rank 0 writes the metadata last and then renames the directory to `step_N` and
rewrites `latest`, each an atomic rename. A crash at any point leaves the previous checkpoint
and `latest` untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Piece",
    "save",
    "load",
    "read_metadata",
    "has_checkpoint",
    "Checkpoint",
    "CheckpointError",
    "box_piece",
    "flat_piece",
]


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Piece:
    """Where a local tensor sits inside the full tensor of its key."""

    full_shape: tuple
    box: tuple | None = None  # ((start, stop), ...) per dimension
    flat: tuple | None = None  # (start, stop) in the flattened full tensor


def box_piece(full_shape, dim: int = 0, index: int = 0, parts: int = 1) -> Piece:
    """The `index`-th of `parts` equal blocks along `dim` (how TP shards a weight)."""
    full_shape = tuple(full_shape)
    size = full_shape[dim] // parts
    box = tuple((index * size, (index + 1) * size) if d == dim else (0, s) for d, s in enumerate(full_shape))
    return Piece(full_shape, box=box)


def flat_piece(full_shape, start: int, stop: int) -> Piece:
    return Piece(tuple(full_shape), flat=(start, stop))


def _rank_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    directory: str,
    step: int,
    shards: dict,
    meta: dict | None = None,
    layout: dict | None = None,
    _after_rank_file=None,
) -> str:
    """Collective. `shards` is {key: (tensor, Piece)} for what this rank holds (keys such as
    "param/blocks.0.attn.q.weight" or "exp_avg/..."); a key may appear on several ranks
    (replicas): any copy is used. Returns the final directory."""
    r, n = _rank_world()
    final = os.path.join(directory, f"step_{step:06d}")
    partial = final + ".partial"
    if r == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crashed save
        os.makedirs(partial)
    _barrier()
    payload = {k: (t.detach().to("cpu").clone(), asdict(p)) for k, (t, p) in shards.items()}
    rank_file = os.path.join(partial, f"rank_{r:05d}.pt")
    _atomic_write(rank_file, lambda f: torch.save(payload, f))
    if _after_rank_file is not None:  # tests use this to crash mid-save
        _after_rank_file()
    _barrier()
    if r == 0:
        files = {
            f"rank_{i:05d}.pt": {
                "bytes": os.path.getsize(os.path.join(partial, f"rank_{i:05d}.pt")),
                "sha256": _sha256(os.path.join(partial, f"rank_{i:05d}.pt")),
            }
            for i in range(n)
        }
        doc = {"step": step, "world_size": n, "layout": layout or {}, "meta": meta or {}, "files": files}
        _atomic_write(
            os.path.join(partial, "metadata.json"), lambda f: f.write(json.dumps(doc, indent=1).encode())
        )
        if os.path.exists(final):  # saving the same step again: move the old one out of the way first
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(partial, final)
        _atomic_write(os.path.join(directory, "latest"), lambda f: f.write(os.path.basename(final).encode()))
        shutil.rmtree(final + ".old", ignore_errors=True)
    _barrier()
    return final


class Checkpoint:
    """A verified checkpoint on disk; `full(key)` rebuilds any full tensor."""

    def __init__(self, path: str):
        self.path = path
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.exists(meta_path):
            raise CheckpointError(
                f"{path} has no metadata.json: it is not a complete minipar checkpoint "
                f"(a save that crashed leaves a .partial directory, which is ignored)"
            )
        try:
            self.doc = json.load(open(meta_path))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_path} is corrupt ({e}); load an earlier step instead") from None
        for name, info in self.doc["files"].items():
            f = os.path.join(path, name)
            if not os.path.exists(f):
                raise CheckpointError(
                    f"checkpoint {path} is missing {name}; it was saved by {self.doc['world_size']} ranks"
                )
            if os.path.getsize(f) != info["bytes"] or _sha256(f) != info["sha256"]:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: {name} does not match the size and sha256 "
                    f"recorded at save time; load an earlier step instead"
                )
        self._pieces: dict[str, list] = {}
        for name in sorted(self.doc["files"]):
            for key, (t, p) in torch.load(os.path.join(path, name), weights_only=False).items():
                self._pieces.setdefault(key, []).append((t, Piece(**{k: _tuplify(v) for k, v in p.items()})))

    @property
    def step(self) -> int:
        return self.doc["step"]

    @property
    def meta(self) -> dict:
        return self.doc["meta"]

    def keys(self) -> list[str]:
        return sorted(self._pieces)

    def full(self, key: str) -> torch.Tensor:
        if key not in self._pieces:
            raise CheckpointError(
                f"checkpoint {self.path} has no {key!r}; it has {len(self._pieces)} keys such as "
                f"{self.keys()[:3]}: was it saved from a different model?"
            )
        pieces = self._pieces[key]
        shape = pieces[0][1].full_shape
        out = torch.full(shape, float("nan"), dtype=pieces[0][0].dtype)
        flat = out.view(-1)
        for t, p in pieces:
            if p.full_shape != shape:
                raise CheckpointError(f"{key}: pieces disagree on the full shape ({p.full_shape} vs {shape})")
            if p.flat is not None:
                flat[p.flat[0] : p.flat[1]] = t.reshape(-1)
            else:
                out[tuple(slice(a, b) for a, b in (p.box or [(0, s) for s in shape]))] = t
        if out.is_floating_point() and torch.isnan(out).any():
            raise CheckpointError(f"{key}: the saved pieces do not cover the whole tensor")
        return out

    def check_meta(self, **expected) -> None:
        """Raise, listing every difference, unless the saved meta has these values (e.g. config=...)."""
        diffs = [
            f"{k}: saved {self.meta.get(k)!r}, now {v!r}"
            for k, v in expected.items()
            if self.meta.get(k) != v
        ]
        if diffs:
            raise CheckpointError(f"checkpoint {self.path} does not match this run: " + "; ".join(diffs))


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _path(directory: str, step: int | None) -> str:
    if step is None:
        latest = os.path.join(directory, "latest")
        if not os.path.exists(latest):
            raise CheckpointError(f"no complete checkpoint in {directory} (no 'latest' file)")
        with open(latest) as f:
            return os.path.join(directory, f.read().strip())
    path = os.path.join(directory, f"step_{step:06d}")
    if not os.path.isdir(path):
        have = (
            sorted(n for n in os.listdir(directory) if n.startswith("step_") and not n.endswith(".partial"))
            if os.path.isdir(directory)
            else []
        )
        raise CheckpointError(
            f"no checkpoint of step {step} in {directory}; it has {', '.join(have) or 'none'}"
        )
    return path


def load(directory: str, step: int | None = None) -> Checkpoint:
    """The checkpoint of `step`, or the newest complete one."""
    return Checkpoint(_path(directory, step))


def read_metadata(directory: str, step: int | None = None) -> dict:
    """The metadata of a checkpoint (step, layout, meta) without loading its tensors: cheap
    enough to check a resume before any rank starts. Its rank files must all be there."""
    path = _path(directory, step)
    meta = os.path.join(path, "metadata.json")
    try:
        with open(meta) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a complete checkpoint ({e}); load an earlier step") from None
    missing = [n for n in doc.get("files", {}) if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}")
    return doc


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a complete checkpoint to resume from."""
    try:
        read_metadata(directory)
    except CheckpointError:
        return False
    return True
