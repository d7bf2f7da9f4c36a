"""ZeRO-Infinity's NVMe offload (minipar.offload.NVMeOptimizer, ZeRO(offload="nvme")): parity with
ZeRO-3, the bytes read and written per step against Rajbhandari et al. 2021's 16·Ψ/N, the prefetch
of the next unit, and a disk that cannot hold the states refused before training.

Parity is exact, not just within 1e-5: both sides run torch's AdamW (the same class and flags,
single-tensor) on the same fp32 values, elementwise; NVMe offload only moves those values through
a file, and an fp32 copy through a file is exact. So any kernel set gives the same bits on both."""

import errno
import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from minipar import launch
from minipar.dp import train_steps
from minipar.model import GPT, GPTConfig
from minipar.offload import GRAD, NVMeOptimizer, ShardOptimizer, check_nvme
from minipar.precision import MixedPrecision
from minipar.runtime import RankError
from minipar.validation import ConfigError
from minipar.zero import ZeRO, check_offload, gpt_units, nvme_bytes, train_zero

ODD = GPTConfig(vocab=61, seq=16, layers=2, heads=3, hidden=27)  # every unit padded on 2 ranks


def _zero3_and_nvme(nvme_dir):
    out = {}
    for offload in (False, "nvme"):
        torch.manual_seed(0)
        z = ZeRO(GPT(ODD, 0), 3, offload=offload, nvme_dir=nvme_dir if offload else None)
        seen = {}

        def first_backward(step, z=z, seen=seen):
            if step == 0:
                seen["grads"] = [g.clone() for g in z.local_grads()]
            if step == 1 and offload:  # what step 0 wrote to disk and read back for its update
                seen["from_disk"] = [f[GRAD].clone() for f in z.optim.files]

        losses = train_steps(z, z.step, ODD, 3, 8, on_backward=first_backward)
        out[offload] = dict(
            losses=losses,
            params=z.full_parameters(),
            **seen,
            io=getattr(z.optim, "io", None),
            memory=z.model_state_bytes(),
            padded=sum(u.padded for u in z.units),
            names=os.listdir(nvme_dir),
        )
        if offload:
            z.optim.close()
    out["bf16_nvme"] = train_zero(
        ODD, 3, steps=3, precision=MixedPrecision("bf16"), offload="nvme", nvme_dir=nvme_dir
    )
    out["bf16_cpu"] = train_zero(ODD, 3, steps=3, precision=MixedPrecision("bf16"), offload="cpu")
    return out


def test_nvme_offload_matches_zero3_exactly_and_moves_16_bytes_per_parameter_each_way(tmp_path):
    res = launch(_zero3_and_nvme, 2, str(tmp_path), timeout=120)
    for r, out in enumerate(res):
        zero3, nvme = out[False], out["nvme"]
        for g, h, d in zip(zero3["grads"], nvme["grads"], nvme["from_disk"]):  # first backward
            assert torch.equal(g, h) and torch.equal(h, d)
        assert nvme["losses"] == zero3["losses"]
        for name, p in zero3["params"].items():
            assert torch.equal(nvme["params"][name], p), name
        assert out["bf16_nvme"]["losses"] == out["bf16_cpu"]["losses"]  # 16-bit compute, fp32 masters
        for name, p in out["bf16_cpu"]["params"].items():
            assert torch.equal(out["bf16_nvme"]["params"][name], p), name
        # ZeRO-Infinity Sec. 4.1: each step reads and writes every optimizer state once, 16 bytes per
        # parameter (fp32 master, gradient, momentum, variance), of this rank's Ψ'/N
        shard = nvme["padded"] // 2
        assert nvme["io"] == [dict(read=16 * shard, written=16 * shard)] * 3
        assert out["bf16_nvme"]["io"] == [dict(read=16 * shard, written=16 * shard)] * 3
        assert nvme_bytes(gpt_units(GPT(ODD)), 2) == 2 * 16 * shard  # the pre-launch estimate
        assert nvme["names"] == []  # mapped, then unlinked: a crashed rank leaves nothing on the disk
        m = nvme["memory"]
        assert (
            m["where"] == "nvme" and m["nvme"] == 16 * shard and m["optimizer"] == 12 * shard
        )  # mapped bytes
        assert m["params"] + m["grads"] == 8 * shard  # fp32 P + G on the device


def test_the_next_unit_is_read_while_this_one_steps(tmp_path):
    shards = [torch.randn(1000) for _ in range(4)]
    opt = NVMeOptimizer([s.clone() for s in shards], str(tmp_path))
    ref = ShardOptimizer([s.clone() for s in shards], offload=True)
    log, read, adamw = [], opt._read, opt._adamw

    def slow(kind, fn):
        def run(i, *args):
            t0 = time.perf_counter()
            time.sleep(0.02)
            fn(i, *args)
            log.append((kind, i, t0, time.perf_counter()))

        return run

    opt._read, opt._adamw = slow("read", read), slow("step", adamw)
    for step in range(2):
        grads = [torch.randn(1000, generator=torch.Generator().manual_seed(10 * step + i)) for i in range(4)]
        opt.step(grads)
        ref.step(grads)
    for a, b in zip(opt.shards, ref.shards):
        assert torch.equal(a, b)
    span = {(k, i): (t0, t1) for k, i, t0, t1 in log[-8:]}
    overlapped = [
        i
        for i in range(3)
        if span["read", i + 1][0] < span["step", i][1] and span["step", i][0] < span["read", i + 1][1]
    ]
    assert overlapped, log  # some read of unit i+1 ran while unit i stepped
    assert opt.state_bytes()["host"] == 2 * 16 * 1000  # two units in host memory, not four
    opt.close()


def test_a_disk_that_cannot_hold_the_states_is_refused_before_training(tmp_path, monkeypatch):
    need = nvme_bytes(gpt_units(GPT(ODD)), 2)
    check_offload("nvme", str(tmp_path), need)  # fine
    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_offload("nvme", "/proc/minipar-nvme", need)
    with pytest.raises(ConfigError, match="bytes free, NVMe offload needs"):
        check_nvme(str(tmp_path), 1 << 62)
    with pytest.raises(ConfigError, match="needs nvme_dir="):
        check_offload("nvme")
    with pytest.raises(ConfigError, match="not one of"):
        check_offload("disk")

    # the disk fills up between the check and the files: reserving the blocks fails, still at setup
    def full(fd, offset, n):
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ConfigError, match=r"\(No space left on device\); free some space"):
        NVMeOptimizer([torch.zeros(8)], str(tmp_path))
    # inside a launch the rank stops while building ZeRO, before any step (a full disk, as the fork sees it)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=0))
    with pytest.raises(RankError, match="its disk has 0 bytes free"):
        launch(
            train_zero,
            1,
            ODD,
            3,
            steps=1,
            batch_size=2,
            offload="nvme",
            nvme_dir=str(tmp_path / "x"),
            timeout=30,
        )
