"""Starting ranks, and what a rank knows about itself.

`launch(fn, world_size)` is the only entry point a notebook or a script needs:

* Locally it forks `world_size` processes, each a gloo rank with the default
  process group initialized, and returns their return values in rank order.
  We fork (not spawn) because spawn pickles `fn` by reference and so cannot run
  a function defined in a notebook cell.
* Under `torchrun` (RANK/WORLD_SIZE in the environment) it runs `fn` in this
  process, on NCCL when CUDA is present, and all-gathers the return values.

A rank that raises ends the whole launch within seconds: the parent kills the
others and re-raises `RankError` with that rank's traceback. No process
outlives the call.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

__all__ = ["launch", "RankError", "device", "rank", "world_size", "is_torchrun", "backend"]

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait before gloo gives up


class RankError(RuntimeError):
    """Raised in the caller when a rank fails; carries that rank's traceback."""

    def __init__(self, rank: int, tb: str):
        self.rank, self.remote_traceback = rank, tb
        super().__init__(f"rank {rank} failed:\n{tb}")


def is_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def device() -> torch.device:
    """Where this rank's tensors live: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _die_with_parent() -> None:
    # Linux only: if the parent (a notebook kernel) dies, the kernel kills us too,
    # so a crashed kernel never leaves ranks behind.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _child(fn, args, kwargs, r, n, timeout, conn) -> None:
    # One OpenMP thread per rank: forking after the parent used several threads
    # deadlocks GNU OpenMP, and N ranks on few cores run faster this way anyway.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    _die_with_parent()
    os.environ.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))
    try:
        port = conn.recv()  # sent once every rank is forked and the parent's store is up
        store = dist.TCPStore("127.0.0.1", port, n, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=r, world_size=n, timeout=timedelta(seconds=timeout))
    except BaseException:  # noqa: BLE001 - the parent may simply try again
        conn.send(("rendezvous", traceback.format_exc()))
        os._exit(0)
    try:
        from . import trace
        trace.reset()
        out = fn(*args, **kwargs)
        payload = ("ok", pickle.dumps(out))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        payload = ("err", traceback.format_exc())
    try:
        conn.send(payload)
    except Exception:  # the result itself would not pickle
        conn.send(("err", traceback.format_exc()))
    conn.close()
    # Skip destroy_process_group: peers may be gone, and exiting closes sockets anyway.
    os._exit(0)


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def launch(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return their results in rank order.

    `timeout` bounds every collective (a rank that skips one is caught after it).
    """
    if not callable(fn):
        raise TypeError(f"launch needs a callable as its first argument, got {type(fn).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")

    if is_torchrun():
        return _launch_torchrun(fn, world_size, args, kwargs, timeout)
    for attempt in range(RENDEZVOUS_TRIES):
        try:
            return _launch_local(fn, world_size, args, kwargs, timeout)
        except _RendezvousFailed as e:  # nothing ran yet: start over with fresh processes
            failed = e
    raise RankError(failed.rank, f"could not connect the {world_size} ranks after {RENDEZVOUS_TRIES} tries; "
                                 f"the last error:\n{failed.tb}")


RENDEZVOUS_TRIES = 3


class _RendezvousFailed(Exception):
    def __init__(self, rank: int, tb: str):
        self.rank, self.tb = rank, tb


def _launch_local(fn, world_size: int, args, kwargs, timeout: float) -> list:
    """Fork the ranks, host their rendezvous, collect their results (one attempt)."""
    # torch.optim imports torch._dynamo at a process's first optimizer step, which takes
    # seconds; importing it once here means every forked rank starts with it loaded.
    import torch._dynamo  # noqa: F401
    ctx = get_context("fork")
    procs, conns, store = [], [], None
    for r in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=True)
        p = ctx.Process(target=_child, args=(fn, args, kwargs, r, world_size, timeout, child_end),
                        daemon=True, name=f"minipar-rank{r}")
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    # The parent hosts the rendezvous store on a port the OS hands it atomically (picking a free
    # port for rank 0 to bind later races with every other process on the host). It starts only
    # after every fork, so no child inherits the store's server thread mid-request.
    try:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))
        for c in conns:
            c.send(store.port)
    except BaseException:
        _kill(procs)
        raise

    results: dict[int, object] = {}
    try:
        pending = dict(enumerate(conns))
        sentinels = {p.sentinel: r for r, p in enumerate(procs)}
        while pending:
            ready = wait(list(pending.values()) + list(sentinels), timeout=1.0)
            for obj in ready:
                if obj in sentinels:  # a process exited; did it report first?
                    r = sentinels.pop(obj)
                    if r in pending and not pending[r].poll(0.5):
                        raise RankError(r, f"process exited with code {procs[r].exitcode} "
                                           "without reporting (killed, or crashed in C code)")
                    continue
                r = next(k for k, c in pending.items() if c is obj)
                try:
                    status, data = obj.recv()
                except EOFError:
                    raise RankError(r, f"process died (exit code {procs[r].exitcode})") from None
                del pending[r]
                if status == "rendezvous":  # a process group that never formed: no fn has run
                    raise _RendezvousFailed(r, data)
                if status == "err":
                    raise RankError(r, data)
                results[r] = pickle.loads(data)
    finally:
        _kill(procs)
        for c in conns:
            c.close()
        del store
    return [results[r] for r in range(world_size)]


def _launch_torchrun(fn, n, args, kwargs, timeout):
    if int(os.environ["WORLD_SIZE"]) != n:
        raise ValueError(f"launch(world_size={n}) under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                         f"pass --nproc_per_node so that the two agree")
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=max(timeout, 300)))
    from . import trace
    trace.reset()
    out = fn(*args, **kwargs)
    gathered = [None] * n
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()  # a later launch in the same program initializes afresh
    return gathered


def wall() -> float:
    """One clock for every rank on a host (CLOCK_MONOTONIC is shared across processes)."""
    return time.perf_counter()


if __name__ == "__main__":  # pragma: no cover - smoke test: python -m minipar.runtime
    print(launch(lambda: (rank(), world_size()), 4))
    sys.exit(0)
