"""The optimizer over this rank's flat shards: its state on the device, on the host (ZeRO-Offload),
or in files on NVMe (ZeRO-Infinity).

ZeRO (stages 1-3) steps AdamW on flat shards of the parameters. Where the fp32 master weights and
Adam's moments (K·Ψ/N bytes) live is a separate choice:

* on the compute device (default). With fp32 compute the shard *is* the master weight,
  so K = 8 (two moments); with 16-bit compute a separate fp32 master is kept, K = 12.
* on the host: ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
  Training", Sec. 4). The device keeps only 16-bit parameters and gradients; per step it sends
  the gradient shard device->host (G·Ψ/N bytes), the CPU runs Adam, and the updated shard comes
  back host->device (P·Ψ/N bytes). The device's model states drop from (P + G + K)Ψ/N to (P + G)Ψ/N.
* on NVMe: ZeRO-Infinity (Rajbhandari et al. 2021, "ZeRO-Infinity: Breaking the GPU Memory Wall
  for Extreme Scale Deep Learning", SC21). Host memory holds only the units in flight; the
  optimizer states live in files, memory-mapped. Sec. 4.1 counts what the step must move: it
  reads and writes every optimizer state once, the fp32 parameter, gradient, momentum and
  variance, 16 bytes per parameter:

      bytes read per step = bytes written per step = 16 · Ψ/N          (per rank)

  (`NVMeOptimizer` below; the gradient is written when it leaves the device and read back for
  the step, the master and moments are read, stepped and written back.)

The same code serves a GPU machine (device = cuda, host = cpu, pinned buffers) and the laptop
(both are the CPU: the copies are real but stay in the same memory, and the bookkeeping below
still tells device bytes from host bytes from disk bytes).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn

from .dp import held_bytes
from .model import make_optimizer
from .runtime import device as compute_device
from .runtime import rank, world_size
from .validation import ConfigError, Problems, nearest_existing

__all__ = [
    "ShardOptimizer",
    "NVMeOptimizer",
    "OFFLOADS",
    "shard_optimizer",
    "check_offload",
    "nvme_bytes",
    "host_device",
    "nvme_problems",
    "check_nvme",
    "NVME_BYTES_PER_PARAM",
]

OFFLOADS = (False, True, "cpu", "nvme")  # where the optimizer runs: device, host (True = "cpu"), NVMe


def host_device() -> torch.device:
    return torch.device("cpu")


class ShardOptimizer:
    """AdamW (minipar's `make_optimizer`) over `shards` (the flat shards this rank owns,
    in the compute dtype). step(grads) updates the shards in place."""

    def __init__(self, shards: list[torch.Tensor], offload: bool = False, **optim):
        self.shards, self.offload = shards, offload
        self.state_device = host_device() if offload else compute_device()
        pin = offload and compute_device().type == "cuda"  # page-locked: fast async host->device
        self.masters = []
        for s in shards:
            if not offload and s.dtype == torch.float32:
                m = s  # fp32 on the device: the shard is its own master, stepped in place
            else:
                m = torch.empty(s.shape, dtype=torch.float32, device=self.state_device, pin_memory=pin)
                m.copy_(s)
            self.masters.append(m.requires_grad_())
        self.optimizer = make_optimizer(self.masters, **optim)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        for m, g in zip(self.masters, grads):
            # device->host for offload (blocking: the CPU step reads it next); a cast for 16-bit
            # gradients; no copy at all for fp32 on the device
            m.grad = g.to(device=m.device, dtype=torch.float32)
        self.optimizer.step()
        for s, m in zip(self.shards, self.masters):
            m.grad = None
            if m is not s:
                s.copy_(m, non_blocking=True)  # host->device, rounding to the compute dtype

    def state_bytes(self) -> dict:
        """Bytes of optimizer state: masters that are not the shards themselves, and the
        moments; AdamW's scalar `step` counters apart. `where` says host or device."""
        own = [m for m, s in zip(self.masters, self.shards) if m is not s]
        st = [v for d in self.optimizer.state.values() for v in d.values() if torch.is_tensor(v)]
        return dict(
            optimizer=held_bytes(own + [v for v in st if v.dim() > 0]),
            optimizer_scalars=sum(v.numel() * v.element_size() for v in st if v.dim() == 0),
            where="host" if self.offload else "device",
        )


# ----------------------------------------------------------------------------- ZeRO-Infinity: NVMe
ROWS = ("master", "grad", "exp_avg", "exp_avg_sq")  # one fp32 row each, per unit's shard
NVME_BYTES_PER_PARAM = 4 * len(ROWS)  # 16: ZeRO-Infinity's optimizer states per parameter
MASTER, GRAD, EXP_AVG, EXP_AVG_SQ = range(len(ROWS))


def nvme_problems(
    nvme_dir, nbytes: int, problems: Problems | None = None, field: str = "nvme_dir"
) -> Problems:
    """Add to `problems` why `nvme_dir` cannot hold `nbytes`: not writable (a probe file is
    written), or not enough free space on its disk."""
    p = problems if problems is not None else Problems()
    if p.output_dir(field, nvme_dir):
        free = shutil.disk_usage(nearest_existing(nvme_dir)).free
        if free < nbytes:
            p.add(
                f"{p.show(field, nvme_dir)}: its disk has {free:,} bytes free, NVMe offload needs {nbytes:,} "
                f"({NVME_BYTES_PER_PARAM} bytes per parameter: fp32 master, gradient and Adam's two moments); "
                "free some space or choose another disk"
            )
    return p


def check_nvme(nvme_dir, nbytes: int) -> None:
    """Raise ConfigError unless `nvme_dir` is writable and its disk has `nbytes` free."""
    nvme_problems(nvme_dir, nbytes).raise_if_any("NVMe offload cannot start")


def _reserve(path: str, nbytes: int) -> None:
    """Create `path` with `nbytes` of disk blocks allocated now, so that a disk that fills up
    fails here, before training, and not at some step's write (posix_fallocate)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)  # also zero-fills: the moments start at 0, as AdamW's do
    except OSError as e:
        raise ConfigError(
            [
                f"cannot reserve {nbytes:,} bytes in {path} ({os.strerror(e.errno)})"
                + ("; free some space or choose another disk" if e.errno == errno.ENOSPC else "")
            ],
            "NVMe offload cannot start",
        ) from None
    finally:
        os.close(fd)


class NVMeOptimizer:
    """ZeRO-Infinity's optimizer: AdamW over `shards` with every optimizer state in a file on NVMe.

    Each shard (a ZeRO unit's part on this rank) gets one file of four fp32 rows (`ROWS`), mapped
    into memory (numpy.memmap). A step:
      1. writes each gradient shard, in fp32, into its file (it leaves the device);
      2. unit by unit, reads the four rows into a host buffer, runs AdamW there (the CPU step of
         ZeRO-Offload), copies the new master into the shard (host->device, rounding to the compute
         dtype) and writes master and moments back. One I/O thread reads unit i+1 into the second
         buffer while unit i steps: host memory holds two units, not the model.
    `io` lists the bytes read and written per step, counted at each copy through the mapping.
    The files have no name once mapped: the disk space is this process's while it lives."""

    def __init__(
        self, shards: list[torch.Tensor], nvme_dir: str, tag: str = "rank0", sharing: int = 1, **optim
    ):
        self.shards, self.where = shards, "nvme"
        numels = [s.numel() for s in shards]
        need = NVME_BYTES_PER_PARAM * sum(numels)
        check_nvme(nvme_dir, need * sharing)  # every rank on this host writes to this disk
        os.makedirs(nvme_dir, exist_ok=True)
        scratch, self.files = tempfile.mkdtemp(dir=nvme_dir, prefix=f"minipar-{tag}-"), []
        try:
            for i, numel in enumerate(numels):
                path = os.path.join(scratch, f"unit{i}.bin")
                _reserve(path, NVME_BYTES_PER_PARAM * numel)
                self.files.append(
                    torch.from_numpy(np.memmap(path, np.float32, "r+", shape=(len(ROWS), numel)))
                )
                # scratch space: the mapping keeps the blocks, the name goes now, so that no rank that
                # crashes or is killed (forked ranks end with os._exit) leaves gigabytes behind
                os.unlink(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        pin = compute_device().type == "cuda"
        self.buffers = [torch.empty(len(ROWS), max(numels), pin_memory=pin) for _ in range(2)]
        # AdamW steps stand-in parameters pointed, one at a time, at the rows of the buffer in hand
        self.params = [nn.Parameter(torch.empty(0)) for _ in shards]
        self.optimizer = make_optimizer(self.params, **optim)
        self.io_thread = ThreadPoolExecutor(1, thread_name_prefix="nvme")  # runs reads/writes in queue order
        self.io, self.read, self.written = [], 0, 0
        with torch.no_grad():
            for f, s in zip(self.files, shards):  # the initial masters (setup, not counted per step)
                f[MASTER].copy_(s.detach().float().cpu())

    # ---- the only places bytes cross the mapping: count them here
    def _read(self, i: int, buf: torch.Tensor) -> None:
        buf[:, : self.shards[i].numel()].copy_(self.files[i])
        self.read += self.files[i].numel() * 4

    def _write(self, i: int, rows, src: torch.Tensor) -> None:
        for row, part in zip(rows, src):
            self.files[i][row].copy_(part)
            self.written += part.numel() * 4

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.read = self.written = 0
        q = self.io_thread.submit
        for i, g in enumerate(grads):  # 1. gradients leave the device, in fp32
            q(self._write, i, (GRAD,), g.detach().to("cpu", torch.float32).unsqueeze(0))
        pending, writes = q(self._read, 0, self.buffers[0]), []
        for i, shard in enumerate(self.shards):  # 2. read, step, write back: unit by unit
            pending.result()
            if i + 1 < len(self.shards):  # prefetch: queued after write i-1, so its buffer is free
                pending = q(self._read, i + 1, self.buffers[(i + 1) % 2])
            buf = self.buffers[i % 2][:, : shard.numel()]
            self._adamw(i, buf)
            shard.copy_(buf[MASTER])  # host->device (blocking: the buffer is reused soon)
            writes.append(
                q(self._write, i, (MASTER, EXP_AVG, EXP_AVG_SQ), buf[[MASTER, EXP_AVG, EXP_AVG_SQ]])
            )
        for w in writes:
            w.result()
        self.io.append(dict(read=self.read, written=self.written))

    def _adamw(self, i: int, buf: torch.Tensor) -> None:
        """torch's AdamW, unchanged, on the rows in `buf`: point the stand-in parameter, its gradient
        and its state at them (AdamW updates param and moments in place)."""
        p, st = self.params[i], self.optimizer.state[self.params[i]]
        p.data, p.grad = buf[MASTER], buf[GRAD]
        if not st:
            st["step"] = torch.tensor(0.0)  # as AdamW's own first step makes it
        st["exp_avg"], st["exp_avg_sq"] = buf[EXP_AVG], buf[EXP_AVG_SQ]
        self.optimizer.step()  # only p has a gradient: only p steps
        p.grad = None

    def state_bytes(self) -> dict:
        """Bytes of optimizer state: master and moments (K = 12) on NVMe, with the fp32 gradient
        row `nvme` counts the files (16 per parameter); `host` the two staging buffers."""
        numel = sum(s.numel() for s in self.shards)
        return dict(
            optimizer=12 * numel,
            optimizer_scalars=4 * sum(1 for p in self.params if self.optimizer.state[p]),
            nvme=sum(f.numel() * 4 for f in self.files),
            host=held_bytes(self.buffers),
            where="nvme",
        )

    def close(self) -> None:
        """Finish the I/O and give the disk space back (the files have no name: unmapping frees them)."""
        self.io_thread.shutdown(wait=True)
        self.files = []


def check_offload(offload, nvme_dir=None, nbytes: int = 0) -> None:
    """ConfigError unless `offload` is one of OFFLOADS and, for "nvme", `nvme_dir` is a writable
    directory whose disk has `nbytes` free (`zero.nvme_bytes`). Call it before `launch`."""
    p = Problems()
    if p.choice("offload", offload, OFFLOADS) and offload == "nvme":
        if nvme_dir is None:
            p.add('offload="nvme" needs nvme_dir=, a directory on the NVMe disk for the optimizer states')
        else:
            nvme_problems(nvme_dir, nbytes, p)
    elif nvme_dir is not None and offload in OFFLOADS:
        p.add(f'nvme_dir={nvme_dir!r} is used only with offload="nvme" (got offload={offload!r})')
    p.raise_if_any("ZeRO cannot offload like this")


def nvme_bytes(units, n: int) -> int:
    """Disk bytes NVMe offload needs on a host of `n` ranks for ZeRO `units` ([(name, [modules])], e.g.
    `zero.gpt_units(model)`; a model on the "meta" device costs no memory): 16 per padded parameter."""
    numels = [sum(p.numel() for m in mods for p in m.parameters()) for _, mods in units]
    return NVME_BYTES_PER_PARAM * sum(-(-k // n) * n for k in numels)


def shard_optimizer(shards: list[torch.Tensor], offload=False, nvme_dir: str | None = None, **optim):
    """The optimizer for `shards` where `offload` says: ShardOptimizer on the device or the host,
    NVMeOptimizer (whose files share this host's disk with every local rank) for "nvme"."""
    check_offload(offload, nvme_dir)
    if offload == "nvme":
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        return NVMeOptimizer(shards, nvme_dir, tag=f"rank{rank()}", sharing=sharing, **optim)
    return ShardOptimizer(shards, offload=bool(offload), **optim)
