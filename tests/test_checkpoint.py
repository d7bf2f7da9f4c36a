"""Sharded, atomic checkpoints that load under another layout."""

import os

import pytest
import torch

import minipar
from minipar import checkpoint as ckpt
from minipar import runtime

FULL = {"w": torch.arange(24.0).view(4, 6), "b": torch.arange(10.0)}


def _save_sharded(path, step, crash=False):
    r, n = runtime.rank(), runtime.world_size()
    shards = {"param/w": (FULL["w"].chunk(n, dim=1)[r], ckpt.box_piece((4, 6), dim=1, index=r, parts=n))}
    lo, hi = r * 10 // n, (r + 1) * 10 // n  # uneven flat ranges, like ZeRO shards
    shards["param/b"] = (FULL["b"][lo:hi], ckpt.flat_piece((10,), lo, hi))
    hook = (lambda: os._exit(1)) if crash and r == 1 else None
    ckpt.save(path, step, shards, meta={"config": {"hidden": 6}}, layout={"tp": n}, _after_rank_file=hook)
    return True


def test_save_on_two_ranks_load_on_one_and_on_three(tmp_path):
    minipar.launch(_save_sharded, 2, str(tmp_path), 10)
    c = ckpt.load(str(tmp_path))
    assert c.step == 10 and c.doc["world_size"] == 2 and c.doc["layout"] == {"tp": 2}
    assert torch.equal(c.full("param/w"), FULL["w"]) and torch.equal(c.full("param/b"), FULL["b"])
    # a 3-way layout keeps its own slices of the same full tensors
    for r in range(3):
        assert torch.equal(c.full("param/w").chunk(3, dim=1)[r], FULL["w"][:, 2 * r : 2 * r + 2])


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    minipar.launch(_save_sharded, 2, str(tmp_path), 10)
    with pytest.raises(minipar.RankError):
        minipar.launch(_save_sharded, 2, str(tmp_path), 20, crash=True)
    assert os.path.isdir(tmp_path / "step_000020.partial") and not os.path.exists(tmp_path / "step_000020")
    c = ckpt.load(str(tmp_path))
    assert c.step == 10 and torch.equal(c.full("param/w"), FULL["w"])
    with pytest.raises(ckpt.CheckpointError, match="not a complete"):
        ckpt.Checkpoint(str(tmp_path / "step_000020.partial"))
    minipar.launch(_save_sharded, 2, str(tmp_path), 20)  # the next save cleans up and succeeds
    assert ckpt.load(str(tmp_path)).step == 20


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    minipar.launch(_save_sharded, 2, str(tmp_path), 5)
    c = ckpt.load(str(tmp_path), step=5)
    with pytest.raises(ckpt.CheckpointError, match=r"does not match this run: config"):
        c.check_meta(config={"hidden": 8})
    with pytest.raises(ckpt.CheckpointError, match="no 'param/x'"):
        c.full("param/x")
    f = tmp_path / "step_000005" / "rank_00001.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.load(str(tmp_path / "nowhere"))


def test_incomplete_coverage_is_detected(tmp_path):
    ckpt.save(str(tmp_path), 1, {"param/b": (FULL["b"][:4], ckpt.flat_piece((10,), 0, 4))})
    with pytest.raises(ckpt.CheckpointError, match="do not cover"):
        ckpt.load(str(tmp_path)).full("param/b")
