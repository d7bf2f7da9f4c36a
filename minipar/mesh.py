"""Named parallel axes over the world, built from scratch with `new_group`.

A mesh lays the world's ranks out as an N-D grid, axes listed outermost first:

    Mesh(pp=2, dp=2, tp=2)   # rank = (pp_i * 2 + dp_i) * 2 + tp_i

The *last* axis varies fastest, so consecutive ranks share it. Put `tp` last:
tensor parallelism talks every layer, and consecutive ranks are the ones on the
same node (NVLink). Megatron-LM's default order is the same: tp innermost, then
cp, then dp, and pp outermost (slowest links, least traffic). Any subset of
dp, pp, tp, cp, ep (or other names) and any order works.

The group of axis `a` holding rank r contains the ranks whose coordinates equal
r's on every axis but `a`. Every rank must call `new_group` for every group, in
the same order, even the groups it is not in: that is torch's contract.
"""

from __future__ import annotations

import itertools
import math

import torch.distributed as dist

from . import runtime

__all__ = ["Mesh", "MeshError", "check_sizes", "enumerate_groups", "get_mesh", "set_mesh"]

KNOWN_AXES = ("pp", "dp", "cp", "ep", "tp")


class MeshError(ValueError):
    pass


def check_sizes(world_size: int, axes: dict[str, int]) -> None:
    """Raise a MeshError that says what would fit unless the sizes multiply to the world."""
    bad = {a: s for a, s in axes.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive ints, got {bad}")
    prod = math.prod(axes.values())
    if prod == world_size:
        return
    shape = " x ".join(f"{a}={s}" for a, s in axes.items()) or "(no axes)"
    fixes = []
    for a, s in axes.items():
        others = prod // s
        if world_size % others == 0:
            fixes.append(f"{a}={world_size // others}")
    hint = f" Keeping the other axes, {' or '.join(fixes)} would fit." if fixes else ""
    raise MeshError(
        f"mesh {shape} has {prod} ranks but the world has {world_size}; "
        f"the axis sizes must multiply to the world size.{hint}"
    )


def enumerate_groups(axes: dict[str, int], axis: str) -> list[list[int]]:
    """All rank groups along `axis`, without touching torch.distributed (for teaching)."""
    names, sizes = list(axes), list(axes.values())
    k = names.index(axis)
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    groups = []
    others = [range(s) if i != k else [0] for i, s in enumerate(sizes)]
    for coord in itertools.product(*others):
        base = sum(c * st for c, st in zip(coord, strides))
        groups.append([base + j * strides[k] for j in range(sizes[k])])
    return groups


class Mesh:
    """Named axes over the world: rank <-> coordinates, and one process group per axis."""

    def __init__(self, world_size: int | None = None, **axes: int):
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else math.prod(axes.values())
        check_sizes(world_size, axes)
        self.axes = dict(axes)
        self.world_size = world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._groups: dict[str, object] = {}
        self._members: dict[str, list[int]] = {}
        if dist.is_initialized():
            for a in self.axes:
                if self.axes[a] == 1:  # a group of one rank communicates nothing (comm skips it)
                    continue
                for ranks in enumerate_groups(self.axes, a):
                    g = dist.new_group(ranks)  # collective: every rank, every group, same order
                    if self.rank in ranks:
                        self._groups[a], self._members[a] = g, ranks
                        _GROUP_NAMES[g] = a
        set_mesh(self)

    # coordinates --------------------------------------------------------
    def coords(self, rank: int | None = None) -> dict[str, int]:
        r = self.rank if rank is None else rank
        out = {}
        for a in reversed(list(self.axes)):
            r, out[a] = divmod(r, self.axes[a])
        return {a: out[a] for a in self.axes}

    def rank_of(self, **coords: int) -> int:
        r = 0
        for a, s in self.axes.items():
            r = r * s + coords.get(a, 0)
        return r

    def size(self, axis: str) -> int:
        return self.axes.get(axis, 1)

    def index(self, axis: str) -> int:
        """This rank's coordinate along `axis` (0 if the mesh lacks the axis)."""
        return self.coords().get(axis, 0)

    def group(self, axis: str):
        """The process group of `axis` that holds this rank (None if the mesh lacks the axis or
        it has size 1)."""
        return self._groups.get(axis)

    def ranks(self, axis: str) -> list[int]:
        """Global ranks in this rank's group along `axis`, in axis order."""
        if self.axes.get(axis, 1) == 1:
            return [self.rank]
        return self._members.get(axis) or enumerate_groups(self.axes, axis)[0]

    def groups(self, axis: str) -> list[list[int]]:
        return enumerate_groups(self.axes, axis)

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{a}={s}" for a, s in self.axes.items()) + ")"

    def describe(self) -> str:
        """A table of every rank's coordinates: which rank holds what."""
        lines = ["rank  " + "  ".join(f"{a:>3}" for a in self.axes)]
        for r in range(self.world_size):
            c = self.coords(r)
            lines.append(f"{r:>4}  " + "  ".join(f"{c[a]:>3}" for a in self.axes))
        return "\n".join(lines)


_GROUP_NAMES: dict = {}
_CURRENT: list[Mesh | None] = [None]


def set_mesh(mesh: Mesh | None) -> None:
    _CURRENT[0] = mesh


def get_mesh() -> Mesh | None:
    return _CURRENT[0]


def group_name(group) -> str:
    """The axis name a group was created for, for tracing ('world' for the default group)."""
    if group is None:
        return "world"
    return _GROUP_NAMES.get(group, "group")


# A forked rank starts without the parent's mesh: its groups belong to no process group of the rank.
runtime.at_rank_start(lambda: set_mesh(None))
