"""Starting ranks, and what a rank knows about itself.

`launch(fn, world_size)` is the only entry point a notebook or a script needs:

* Locally it forks `world_size` processes, each a gloo rank with the default
  process group initialized, and returns their return values in rank order.
  We fork (not spawn) because spawn pickles `fn` by reference and so cannot run
  a function defined in a notebook cell.
* Under `torchrun` (RANK/WORLD_SIZE in the environment) it runs `fn` in this
  process, on NCCL when CUDA is present, and all-gathers the return values.

It never hangs and never hides a failure:

* A rank that raises ends the whole launch within seconds: the parent kills the
  others and re-raises `RankError` with that rank's traceback.
* `deadline=` bounds the launched function, from the moment every rank has connected
  (connecting is retried, under an allowance of its own): past it, `DeadlineExceeded` says
  where each rank was (a faulthandler dump of every rank's stack).
* Every rank blocked in communication at once, for `deadlock_after` seconds, is a
  deadlock (on one host a message arrives in milliseconds): `Deadlock` names what each
  rank waits for and on which line. `minipar.comm` reports its blocking waits here.
* `progress_timeout=` ends a run whose ranks stop calling `heartbeat()` (a training
  loop calls it once per step): a rank stuck outside communication is caught too.
* With `grace=` seconds, SIGINT/SIGTERM do not kill the ranks: they are told
  (`stop_requested()`), so a training loop can save its last step and return.
No process outlives the call. The parent's loop that watches the ranks is `minipar.watchdog`.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing import get_context

import torch
import torch.distributed as dist
from tqdm import std as tqdm_std

from .validation import Problems
from .watchdog import (
    Board,
    DeadlineExceeded,
    Deadlock,
    RankError,
    RendezvousFailed,
    kill_all,
    rendezvous_timeout,
    watch,
)

# tqdm's default write lock is a threading lock plus a multiprocessing one shared by every forked
# process. A rank forked while a thread held the first inherited it held forever, and a rank killed
# while it held the second (a fault test's SIGKILL) held it for everyone: both hung later ranks in
# their first progress bar. So: no monitor thread (it takes the lock every few seconds), and every
# process, the launcher and each rank, writes its bars under a threading lock of its own.
tqdm_std.tqdm.monitor_interval = 0
tqdm_std.tqdm.set_lock(threading.RLock())

__all__ = [
    "launch",
    "RankError",
    "DeadlineExceeded",
    "Deadlock",
    "device",
    "rank",
    "world_size",
    "is_torchrun",
    "backend",
    "waiting",
    "heartbeat",
    "stop_requested",
    "wall",
    "at_rank_start",
]

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait before gloo gives up
DEADLOCK_AFTER = 5.0  # seconds every rank may sit blocked in communication at once
RENDEZVOUS_TRIES = 3


# ----------------------------------------------------------------------------- what a rank knows
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


def wall() -> float:
    """One clock for every rank on a host (CLOCK_MONOTONIC is shared across processes)."""
    return time.perf_counter()


# ----------------------------------------------------------------------------- the board
_BOARD: list = [None, 0]  # (board, this rank) inside a forked rank
_AT_START: list = []  # called in every rank before fn (modules below register, see at_rank_start)


def at_rank_start(fn) -> None:
    """Call `fn()` in every rank before the launched function (the trace resets itself so)."""
    _AT_START.append(fn)


_STOP = [0]  # the signal that asked this rank to stop, or 0


@contextmanager
def waiting(what: str):
    """Mark this rank blocked in communication (`what`, e.g. "recv from rank 3") for the parent's
    deadlock detector. `minipar.comm` wraps every blocking wait in it."""
    board, r = _BOARD
    if board is None:
        yield
        return
    board.set_what(r, what)
    board.since[r] = time.monotonic()
    try:
        yield
    finally:
        board.since[r] = 0.0


def heartbeat() -> None:
    """Tell the parent this rank made progress (see `launch(progress_timeout=)`)."""
    board, r = _BOARD
    if board is not None:
        board.beat[r] = time.monotonic()


def stop_requested() -> int:
    """The signal (SIGINT or SIGTERM) that asked this run to stop at the next safe point, or 0."""
    return _STOP[0]


def _request_stop(signum, frame) -> None:
    _STOP[0] = signum


# ----------------------------------------------------------------------------- launch
def check_launch(world_size, timeout, deadline, grace, progress_timeout, deadlock_after) -> None:
    """launch's arguments, all problems at once (ConfigError)."""
    p = Problems()
    p.integer("world_size", world_size, low=1)
    p.number("timeout", timeout, low=0, low_open=True, why="seconds a collective may wait")
    for name, v in (("deadline", deadline), ("progress_timeout", progress_timeout), ("grace", grace)):
        if v is not None:
            p.number(name, v, low=0, low_open=name != "grace")
    p.number("deadlock_after", deadlock_after, low=0, low_open=True)
    p.raise_if_any("launch cannot start")


def launch(
    fn,
    world_size: int,
    *args,
    timeout: float = DEFAULT_TIMEOUT,
    deadline: float | None = None,
    progress_timeout: float | None = None,
    grace: float | None = None,
    deadlock_after: float = DEADLOCK_AFTER,
    **kwargs,
) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return their results in rank order.

    timeout: seconds any collective may wait (gloo/NCCL's own limit). deadline: seconds the
    function may take once every rank has connected. progress_timeout: seconds a rank may go
    without `heartbeat()`. grace: on SIGINT/SIGTERM, seconds the ranks get to stop by themselves (they see
    `stop_requested()`); None stops them at once. deadlock_after: seconds every rank may be
    blocked in communication at once before it counts as a deadlock."""
    if not callable(fn):
        raise TypeError(f"launch needs a callable as its first argument, got {type(fn).__name__}")
    check_launch(world_size, timeout, deadline, grace, progress_timeout, deadlock_after)
    limits = dict(
        timeout=timeout,
        deadline=deadline,
        progress_timeout=progress_timeout,
        grace=grace,
        deadlock_after=deadlock_after,
    )
    if is_torchrun():
        return _launch_torchrun(fn, world_size, args, kwargs, limits)
    for _ in range(RENDEZVOUS_TRIES):
        try:
            return _launch_local(fn, world_size, args, kwargs, limits)
        except RendezvousFailed as e:  # nothing ran yet: start over with fresh processes
            failed = e
    raise RankError(
        max(failed.rank, 0),
        f"could not connect the {world_size} ranks after {RENDEZVOUS_TRIES} tries; "
        f"the last error:\n{failed.tb}",
    )


def _die_with_parent() -> None:
    # Linux only: if the parent (a notebook kernel) dies, the kernel kills us too,
    # so a crashed kernel never leaves ranks behind.
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(fn, args, kwargs, r, n, limits, conn, board, dump_path) -> None:
    # One OpenMP thread per rank: forking after the parent used several threads
    # deadlocks GNU OpenMP, and N ranks on few cores run faster this way anyway.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    _die_with_parent()
    # SIGUSR1 from the parent dumps every thread's stack: where this rank was when time ran out
    dump = open(dump_path, "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    _BOARD[:] = [board, r]
    _STOP[0] = 0
    for sig in (signal.SIGINT, signal.SIGTERM):  # graceful: stop at a safe point; else the parent kills us
        signal.signal(sig, _request_stop if limits["grace"] is not None else signal.SIG_DFL)
    os.environ.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))
    timeout = timedelta(seconds=limits["timeout"])
    try:
        port = conn.recv()  # sent once every rank is forked and the parent's store is up
        store = dist.TCPStore("127.0.0.1", port, n, is_master=False, timeout=rendezvous_timeout(limits))
        dist.init_process_group("gloo", store=store, rank=r, world_size=n, timeout=timeout)
    except BaseException:  # noqa: BLE001 - the parent may simply try again
        conn.send(("rendezvous", traceback.format_exc()))
        os._exit(0)
    board.joined[r] = time.monotonic()
    heartbeat()
    tqdm_std.tqdm.set_lock(threading.RLock())  # the launcher's may have been held at fork (see above)
    try:
        for start in _AT_START:  # e.g. the trace: a forked rank starts empty, not with the parent's events
            start()
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


def _launch_local(fn, world_size: int, args, kwargs, limits) -> list:
    """Fork the ranks, host their rendezvous, collect their results (one attempt)."""
    # torch.optim imports torch._dynamo at a process's first optimizer step, which takes
    # seconds; importing it once here means every forked rank starts with it loaded.
    # (Lazy on purpose: importing it with minipar would cost every `import minipar` 2.6 s.)
    import torch._dynamo  # noqa: F401, PLC0415

    ctx = get_context("fork")
    board = Board(ctx, world_size)
    dumps = tempfile.mkdtemp(prefix="minipar-stacks-")
    dump_paths = [os.path.join(dumps, f"rank{r}.txt") for r in range(world_size)]
    procs, conns, store = [], [], None
    started = time.monotonic()
    for r in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=True)
        p = ctx.Process(
            target=_child,
            args=(fn, args, kwargs, r, world_size, limits, child_end, board, dump_paths[r]),
            daemon=True,
            name=f"minipar-rank{r}",
        )
        p.start()
        p.ident_main = threading.get_ident()  # a forked child's only thread keeps the forking thread's id
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    try:
        # The parent hosts the rendezvous store on a port the OS hands it atomically (picking a free
        # port for rank 0 to bind later races with every other process on the host). It starts only
        # after every fork, so no child inherits the store's server thread mid-request.
        try:
            store = dist.TCPStore(
                "127.0.0.1",
                0,
                world_size,
                is_master=True,
                wait_for_workers=False,
                timeout=rendezvous_timeout(limits),
            )
        except Exception:  # noqa: BLE001 - e.g. its own client timed out on a loaded machine: try again
            raise RendezvousFailed(-1, traceback.format_exc()) from None
        for c in conns:
            c.send(store.port)
        results = watch(procs, conns, board, dump_paths, limits, started)
    finally:
        kill_all(procs)
        for c in conns:
            c.close()
        del store
        shutil.rmtree(dumps, ignore_errors=True)
    return [results[r] for r in range(world_size)]


def _launch_torchrun(fn, n, args, kwargs, limits):
    if int(os.environ["WORLD_SIZE"]) != n:
        p = Problems()
        p.add(
            f"launch(world_size={n}) under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}: "
            "pass --nproc_per_node (times --nnodes) so that the two agree"
        )
        p.raise_if_any("launch cannot start")
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=max(limits["timeout"], 300))
        )
    _STOP[0] = 0
    if limits["grace"] is not None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun's agent forwards both to its workers
            signal.signal(sig, _request_stop)
    if limits["deadline"] is not None:  # no parent watches us here: dump every stack and exit
        faulthandler.dump_traceback_later(limits["deadline"], exit=True)
    for start in _AT_START:
        start()
    try:
        out = fn(*args, **kwargs)
    finally:
        faulthandler.cancel_dump_traceback_later()
    gathered = [None] * n
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()  # a later launch in the same program initializes afresh
    return gathered


if __name__ == "__main__":  # pragma: no cover - smoke test: python -m minipar.runtime
    print(launch(lambda: (rank(), world_size()), 4))
    sys.exit(0)
