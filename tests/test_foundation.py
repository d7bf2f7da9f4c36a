"""Foundation: launcher, mesh, traced communication, Chrome trace, reference model."""

import json
import os
import threading
import time

import pytest
import torch
from _parity import assert_grads_match, assert_params_match
from tqdm import std as tqdm_std
from tqdm.auto import tqdm

import minipar
from minipar import comm, mappings, runtime, trace
from minipar.mesh import Mesh, MeshError, check_sizes, enumerate_groups
from minipar.model import GPT, GPTConfig, SyntheticData, train_reference

CFG = GPTConfig(vocab=64, seq=16, layers=2, heads=4, hidden=32)


# ----------------------------------------------------------------------------- launcher
def _who(x, scale=1):
    return runtime.rank() * scale + x, runtime.world_size()


def test_launch_returns_results_in_rank_order():
    assert minipar.launch(_who, 4, 10, scale=100) == [(10, 4), (110, 4), (210, 4), (310, 4)]
    assert minipar.launch(_who, 1, 0) == [(0, 1)]


def test_launch_runs_local_functions_and_lambdas():
    secret = 7
    assert minipar.launch(lambda: runtime.rank() + secret, 2) == [7, 8]


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        minipar.launch(_who, 0)
    with pytest.raises(TypeError, match="callable"):
        minipar.launch("not a function", 2)


def _raise_on_2():
    if runtime.rank() == 2:
        raise ValueError("rank two is unhappy")
    comm.all_reduce(torch.ones(1))  # the others block here until the launch kills them
    return "unreachable"


def test_failure_on_one_rank_ends_the_launch_quickly():
    t = time.time()
    with pytest.raises(minipar.RankError) as info:
        minipar.launch(_raise_on_2, 4)
    assert time.time() - t < 30
    assert info.value.rank == 2 and "rank two is unhappy" in str(info.value)
    assert "ValueError" in info.value.remote_traceback
    # nothing left behind, and the next launch works
    assert not [p for p in __import__("multiprocessing").active_children() if p.name.startswith("minipar")]
    assert minipar.launch(_who, 2, 0) == [(0, 2), (1, 2)]


def _skip_collective():
    if runtime.rank() == 1:
        time.sleep(60)  # alive but absent: only the collective timeout can catch it
    comm.all_reduce(torch.ones(1))


def test_a_rank_that_never_arrives_is_caught_by_the_timeout():
    t = time.time()
    with pytest.raises(minipar.RankError):
        minipar.launch(_skip_collective, 2, timeout=2)
    assert time.time() - t < 30


def test_a_rank_that_dies_hard_is_reported():
    def die():
        if runtime.rank() == 1:
            os._exit(3)
        time.sleep(20)

    t = time.time()
    with pytest.raises(minipar.RankError, match="rank 1"):
        minipar.launch(die, 2)
    assert time.time() - t < 15


# ----------------------------------------------------------------------------- mesh
@pytest.mark.parametrize(
    "axes",
    [dict(dp=4), dict(dp=2, tp=2), dict(pp=2, dp=2, tp=2), dict(tp=2, dp=3), dict(pp=2, dp=1, cp=2, tp=2)],
)
def test_mesh_enumeration_is_a_partition_and_coordinates_round_trip(axes):
    world = 1
    for s in axes.values():
        world *= s
    mesh = Mesh(world, **axes)
    for a in axes:
        groups = enumerate_groups(axes, a)
        assert sorted(r for grp in groups for r in grp) == list(range(world))
        for grp in groups:  # members differ only in the coordinate of `a`
            cs = [mesh.coords(r) for r in grp]
            assert [c[a] for c in cs] == list(range(axes[a]))
            assert all(
                {k: v for k, v in c.items() if k != a} == {k: v for k, v in cs[0].items() if k != a}
                for c in cs
            )
    for r in range(world):
        assert mesh.rank_of(**mesh.coords(r)) == r


def test_mesh_last_axis_is_consecutive_ranks():
    assert enumerate_groups(dict(dp=2, tp=2), "tp") == [[0, 1], [2, 3]]
    assert enumerate_groups(dict(dp=2, tp=2), "dp") == [[0, 2], [1, 3]]
    assert enumerate_groups(dict(pp=2, dp=2, tp=2), "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_mesh_rejects_sizes_that_do_not_multiply_to_the_world():
    with pytest.raises(MeshError, match=r"6 ranks but the world has 4.*tp=2"):
        check_sizes(4, dict(dp=2, tp=3))
    with pytest.raises(MeshError, match="positive"):
        check_sizes(4, dict(dp=0, tp=4))


def _mesh_groups():
    mesh = Mesh(dp=2, tp=2)
    x = torch.tensor([float(runtime.rank())])
    tp_sum = comm.all_reduce(x.clone(), group="tp").item()
    dp_sum = comm.all_reduce(x.clone(), group="dp").item()
    return mesh.coords(), mesh.ranks("tp"), mesh.ranks("dp"), tp_sum, dp_sum


def test_mesh_groups_communicate_along_their_axis():
    out = minipar.launch(_mesh_groups, 4)
    assert out[0] == ({"dp": 0, "tp": 0}, [0, 1], [0, 2], 1.0, 2.0)
    assert out[3] == ({"dp": 1, "tp": 1}, [2, 3], [1, 3], 5.0, 4.0)


# ----------------------------------------------------------------------------- comm + bytes
def _collectives():
    n, r = runtime.world_size(), runtime.rank()
    x = torch.arange(8, dtype=torch.float32) + r
    ar = comm.all_reduce(x.clone())
    avg = comm.all_reduce(x.clone(), op="avg")
    ag = comm.all_gather(torch.full((2, 3), float(r)), dim=1)
    rs = comm.reduce_scatter(torch.ones(8, 2), dim=0)
    # uneven all-to-all: rank r sends j+1 rows to rank j
    send = torch.full((sum(j + 1 for j in range(n)), 2), float(r))
    a2a = comm.all_to_all(send, output_split_sizes=[r + 1] * n, input_split_sizes=[j + 1 for j in range(n)])
    b = comm.broadcast(torch.tensor([float(r)]), src=1)
    return ar, avg, ag, rs, a2a, b, trace.events()


def test_collectives_values_and_byte_accounting():
    out = minipar.launch(_collectives, 4)
    n = 4
    for r, (ar, avg, ag, rs, a2a, b, evs) in enumerate(out):
        assert torch.equal(ar, 4 * torch.arange(8.0) + 6)
        assert torch.allclose(avg, torch.arange(8.0) + 1.5)
        assert ag.shape == (2, 12) and ag[0].tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3 + [3.0] * 3
        assert torch.equal(rs, torch.full((2, 2), 4.0))
        assert a2a.shape == (n * (r + 1), 2) and a2a[:, 0].tolist() == sum(
            ([float(j)] * (r + 1) for j in range(n)), []
        )
        assert b.item() == 1.0
        by = {e.name: e for e in evs if e.name != "all_reduce"}
        ars = [e for e in evs if e.name == "all_reduce"]
        assert len(ars) == 2 and all(e.bytes == 32 and e.wire_bytes == 2 * 3 / 4 * 32 for e in ars)
        assert by["all_gather"].bytes == 2 * 12 * 4 and by["all_gather"].wire_bytes == 3 / 4 * 96
        assert by["reduce_scatter"].bytes == 64 and by["reduce_scatter"].wire_bytes == 48
        assert by["all_to_all"].bytes == 10 * 2 * 4 and by["all_to_all"].wire_bytes == (10 - (r + 1)) * 8
        assert by["broadcast"].wire_bytes == (4 if r == 1 else 0)
        assert all(e.cat == "comm" and e.end >= e.start and e.axis == "world" for e in evs)


def _fg_ops():
    Mesh(tp=2)
    r = runtime.rank()
    x = torch.full((2, 4), float(r + 1), requires_grad=True)
    mappings.f(x).mul(r + 1).sum().backward()  # backward all-reduces: 1 + 2 = 3
    y = torch.full((2, 4), float(r + 1), requires_grad=True)
    out_g = mappings.g(y)  # forward all-reduces: 3
    out_g.sum().backward()  # backward identity: 1
    z = torch.full((2, 4), float(r + 1), requires_grad=True)
    gathered = mappings.gather_along(z, dim=0)  # [4, 4]
    (gathered * (r + 1)).sum().backward()  # reduce-scatter of (r+1): 3
    w = torch.ones(4, 4, requires_grad=True)
    rs = mappings.reduce_scatter_along(w, dim=0)  # [2, 4] of 2s
    rs.sum().backward()  # all-gather of ones
    return x.grad, out_g.detach(), y.grad, gathered.shape, z.grad, rs.detach(), w.grad


def test_megatron_f_and_g_and_sequence_parallel_operators():
    for x_grad, out_g, y_grad, gshape, z_grad, rs, w_grad in minipar.launch(_fg_ops, 2):
        assert torch.equal(x_grad, torch.full((2, 4), 3.0))
        assert torch.equal(out_g, torch.full((2, 4), 3.0)) and torch.equal(y_grad, torch.ones(2, 4))
        assert gshape == (4, 4) and torch.equal(z_grad, torch.full((2, 4), 3.0))
        assert torch.equal(rs, torch.full((2, 4), 2.0)) and torch.equal(w_grad, torch.ones(4, 4))


def _ring_allreduce_bytes(numel):
    from minipar.collectives import ring_all_reduce

    x = torch.randn(numel, generator=torch.Generator().manual_seed(runtime.rank()))
    want = x.clone()
    torch.distributed.all_reduce(want)
    trace.reset()
    got = ring_all_reduce(x.clone())
    sent = sum(e.wire_bytes for e in trace.events() if e.name == "send")
    return torch.allclose(got, want, atol=1e-5), sent, trace.gather()


def test_ring_all_reduce_sends_2_n_minus_1_over_n_of_the_tensor_and_exports_a_chrome_trace(tmp_path):
    n, numel = 4, 1024
    out = minipar.launch(_ring_allreduce_bytes, n, numel)
    for ok, sent, _ in out:
        assert ok
        assert sent == 2 * (n - 1) / n * numel * 4  # Patarasuk & Yuan 2009: 2(N-1)/N * size
    merged = out[0][2]
    path = tmp_path / "ring.json"
    trace.to_chrome_trace(merged, str(path))
    doc = json.loads(path.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(n))
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    assert names == {r: f"rank {r}" for r in range(n)}
    for e in spans:
        assert (
            e["dur"] >= 0 and e["ts"] >= 0 and e["cat"] in ("comm", "compute") and isinstance(e["name"], str)
        )
    summ = trace.summary(merged)
    assert all(summ[r][("send", "world")]["wire_bytes"] == 2 * 3 / 4 * numel * 4 for r in range(n))


def test_timeline_renders_every_rank():
    import matplotlib

    matplotlib.use("Agg")
    from minipar.timeline import plot_timeline

    evs = [trace.Event(r, "0F1", "compute", 0.1 * r, 0.1 * r + 0.2) for r in range(3)]
    evs += [trace.Event(r, "all_reduce", "comm", 0.3, 0.4, axis="dp", bytes=8) for r in range(3)]
    ax = plot_timeline(evs, title="t")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    assert len(ax.collections) == 6


# ----------------------------------------------------------------------------- reference model
def test_reference_model_is_deterministic_and_learns():
    a, b = GPT(CFG, seed=3), GPT(CFG, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(GPT(CFG, seed=4).wte.weight, a.wte.weight)
    x, y = SyntheticData(CFG.vocab, CFG.seq).batch(0, 4)
    assert torch.equal(x, SyntheticData(CFG.vocab, CFG.seq).batch(0, 4)[0]) and torch.equal(
        x[:, 1:], y[:, :-1]
    )
    r1 = train_reference(CFG, steps=30, batch_size=8)
    r2 = train_reference(CFG, steps=30, batch_size=8)
    assert r1.losses == r2.losses
    assert r1.losses[-1] < r1.losses[0] - 0.5


def test_init_is_independent_of_construction_order():
    from minipar.model import init_tensor

    m = GPT(CFG, seed=5)
    w = init_tensor("blocks.1.mlp.fc.weight", m.blocks[1].mlp.fc.weight.shape, 5, CFG.layers)
    assert torch.equal(w, m.blocks[1].mlp.fc.weight)


def test_gradient_accumulation_matches_the_full_batch():
    """The first step's gradients (mean of 4 micro-batch means = the batch mean), then 3 SGD steps."""
    first = {k: train_reference(CFG, steps=1, batch_size=8, grad_accum=k).grads for k in (1, 4)}
    assert_grads_match(first[4], first[1])
    full, accum = (train_reference(CFG, steps=3, batch_size=8, grad_accum=k, kind="sgd") for k in (1, 4))
    assert_params_match(dict(accum.model.named_parameters()), dict(full.model.named_parameters()))


# ----------------------------------------------------------------------------- never hang
def _ring_that_deadlocks():
    r, n = runtime.rank(), runtime.world_size()
    x = torch.zeros(3)
    comm.recv(x, (r - 1) % n)  # every rank receives first, so nobody ever sends
    comm.send(x, (r + 1) % n)


def test_a_deadlock_is_named_with_what_each_rank_waits_for_and_where():
    t = time.time()
    with pytest.raises(runtime.Deadlock) as info:
        minipar.launch(_ring_that_deadlocks, 3, deadlock_after=2)
    assert time.time() - t < 20
    msg = str(info.value)
    assert msg.startswith("deadlock:")
    for r in range(3):
        assert f"rank {r}: waiting in recv from rank {(r - 1) % 3}" in msg, msg
        assert "test_foundation.py" in info.value.where[r] and "_ring_that_deadlocks" in info.value.where[r]


def _spin():
    while True:
        pass


def test_a_deadline_bounds_the_whole_launch_and_shows_every_rank_s_line():
    t = time.time()
    with pytest.raises(runtime.DeadlineExceeded) as info:
        minipar.launch(_spin, 2, deadline=2)
    assert time.time() - t < 15
    assert "did not finish within 2 s" in str(info.value)
    assert all("in _spin" in info.value.where[r] for r in (0, 1)), info.value.where
    assert "most recent call first" in info.value.stacks[0]


def _steps_then_stall():
    for _ in range(3):
        runtime.heartbeat()
        time.sleep(0.1)
    if runtime.rank() == 1:
        time.sleep(60)  # alive, not communicating, no progress
    comm.barrier()


def test_a_rank_without_progress_is_caught_by_the_progress_timeout():
    t = time.time()
    with pytest.raises(runtime.DeadlineExceeded, match="made no progress for 2 s"):
        minipar.launch(_steps_then_stall, 2, progress_timeout=2)
    assert time.time() - t < 20


def _a_progress_bar():
    return sum(1 for _ in tqdm(range(3), disable=False))


def test_a_rank_forked_while_tqdm_is_locked_does_not_hang():
    """A rank forked while another thread of the parent held tqdm's write lock inherited the lock,
    held by nobody, and hung in its first progress bar (seen in the suite as a serving test that never
    ended). Each rank now starts with fresh locks; the parent's lock is let go after 2 s."""
    held = threading.Event()

    def hold():
        with tqdm_std.tqdm.get_lock():
            held.set()
            time.sleep(2)

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        assert minipar.launch(_a_progress_bar, 2, deadline=20) == [3, 3]
    finally:
        t.join()


def _killed_holding_the_bar_lock():
    if runtime.rank() == 1:
        with tqdm_std.tqdm.get_lock():
            os.kill(os.getpid(), 9)
    return 0


def test_a_rank_killed_holding_tqdms_lock_does_not_hang_the_next_launch():
    """A rank SIGKILLed inside a progress bar's write (as --inject-fault does) must not leave a
    lock that every later rank waits on forever. (tqdm shares its lock with the processes forked after
    the launcher's first bar: reproduced so before the fix, the second launch hung.)"""
    assert _a_progress_bar() == 3
    with pytest.raises(runtime.RankError):
        minipar.launch(_killed_holding_the_bar_lock, 2, deadline=20)
    assert minipar.launch(_a_progress_bar, 2, deadline=20) == [3, 3]
    assert _a_progress_bar() == 3  # nor the launcher's own bars


class _FlakyStore:
    """dist.TCPStore whose parent-side (master) store fails the first `fail` times, and whose
    rank-side clients take `delay` seconds to connect: a loaded machine, reproduced."""

    def __init__(self, real, fail=0, delay=0.0):
        self.real, self.fail, self.delay, self.masters = real, fail, delay, 0

    def __call__(self, *args, is_master=False, **kwargs):
        if is_master:
            self.masters += 1
            if self.masters <= self.fail:
                raise RuntimeError("The client socket has timed out after 5000ms (simulated)")
        else:
            time.sleep(self.delay)
        return self.real(*args, is_master=is_master, **kwargs)


def test_a_rendezvous_store_that_fails_to_start_is_retried(monkeypatch):
    flaky = _FlakyStore(runtime.dist.TCPStore, fail=1)
    monkeypatch.setattr(runtime.dist, "TCPStore", flaky)
    assert minipar.launch(runtime.rank, 2) == [0, 1]
    assert flaky.masters == 2  # the first failed, the launch started over


def _nap():
    time.sleep(1.0)
    return runtime.rank()


def test_a_slow_rendezvous_is_not_charged_to_the_deadline(monkeypatch):
    # connecting takes 3 s here, the function itself 1 s: a 2 s deadline is the function's
    monkeypatch.setattr(runtime.dist, "TCPStore", _FlakyStore(runtime.dist.TCPStore, delay=3.0))
    assert minipar.launch(_nap, 2, deadline=2, timeout=2) == [0, 1]
    with pytest.raises(runtime.DeadlineExceeded, match="did not finish within 2 s"):
        minipar.launch(_spin, 2, deadline=2, timeout=2)  # and the function is still held to it
