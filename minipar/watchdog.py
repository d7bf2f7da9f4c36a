"""The launcher's watchdog: what the parent knows about its forked ranks, and when it gives up.

`runtime.launch` forks the ranks; this module watches them. Every rank shares a small board
with the parent (`Board`, shared memory): since when it has been blocked in communication and on
what, when it last made progress, when it connected. The parent's loop (`watch`) collects each
rank's result and raises as soon as something is wrong:

* a rank raised: `RankError` with its traceback;
* a rank died without reporting (SIGKILL, a crash in C code): `RankError` with its exit code;
* the deadline passed, or a rank made no progress for `progress_timeout` s: `DeadlineExceeded`
  with every rank's Python stack (SIGUSR1 -> faulthandler) and its innermost line of user code;
* every rank blocked in communication at once for `deadlock_after` s: `Deadlock` (on one host a
  message arrives in milliseconds, so this is no slow network);
* the ranks never connected: `RendezvousFailed`, and `launch` starts over.

The deadline and progress clocks start when the last rank has connected: connecting is the
launcher's business, not the launched function's.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait

__all__ = [
    "RankError",
    "DeadlineExceeded",
    "Deadlock",
    "RendezvousFailed",
    "Board",
    "watch",
    "kill_all",
    "rendezvous_timeout",
    "RENDEZVOUS_TIMEOUT",
]

# Seconds the ranks may take to connect, whatever `timeout` the caller gave the collectives: a
# loaded machine can take seconds to schedule a fresh process, and that is nobody's bug.
RENDEZVOUS_TIMEOUT = 60.0
_POLL = 0.25  # how often the parent looks at its ranks


class RankError(RuntimeError):
    """Raised in the caller when a rank fails; carries that rank's traceback."""

    def __init__(self, rank: int, tb: str):
        self.rank, self.remote_traceback = rank, tb
        super().__init__(f"rank {rank} failed:\n{tb}")


class DeadlineExceeded(RankError):
    """The launch ran past its deadline (or made no progress): where every rank was.
    `stacks[r]` is rank r's Python stack, `where[r]` its innermost frame of user code."""

    def __init__(self, message: str, stacks: dict, where: dict):
        self.stacks, self.where = stacks, where
        lines = [message] + [f"  rank {r}: {where.get(r) or '(no stack)'}" for r in sorted(stacks)]
        RuntimeError.__init__(self, "\n".join(lines))
        self.rank, self.remote_traceback = min(stacks, default=0), "\n".join(lines)


class Deadlock(DeadlineExceeded):
    """Every rank was blocked in communication at once: none can ever proceed."""


class RendezvousFailed(Exception):
    """The ranks never formed a process group: no `fn` has run, so the launch may start over."""

    def __init__(self, rank: int, tb: str):
        self.rank, self.tb = rank, tb


class Board:
    """Shared memory between the parent and its forked ranks: since when each rank has been
    blocked in communication (0: it is not), on what, and when it last made progress."""

    WHAT = 160

    def __init__(self, ctx, n: int):
        self.since = ctx.RawArray(ctypes.c_double, n)
        self.beat = ctx.RawArray(ctypes.c_double, n)
        self.joined = ctx.RawArray(ctypes.c_double, n)  # when each rank's process group formed
        self.text = ctx.RawArray(ctypes.c_char, n * self.WHAT)

    def what(self, r: int) -> str:
        raw = bytes(self.text[r * self.WHAT : (r + 1) * self.WHAT])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def set_what(self, r: int, what: str) -> None:
        raw = what.encode()[: self.WHAT - 1].ljust(self.WHAT, b"\0")
        self.text[r * self.WHAT : (r + 1) * self.WHAT] = raw


def kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


_SKIP = (
    os.sep + "torch" + os.sep,
    os.sep + "multiprocessing" + os.sep,
    "threading.py",
    "selectors.py",
    os.path.join("minipar", "runtime.py"),
    os.path.join("minipar", "watchdog.py"),
    os.path.join("minipar", "comm.py"),
    os.path.join("minipar", "mappings.py"),
)


def _innermost(stack: str) -> str:
    """'file:line in func' of the innermost frame outside torch, the standard library's
    process machinery and minipar's own communication layer: the line the user wrote."""
    for line in stack.splitlines():
        line = line.strip()
        if line.startswith('File "') and not any(s in line for s in _SKIP):
            path, rest = line[6:].split('", line ', 1)  # 'File "p.py", line 12 in f'
            return f"{path}:{rest}"
    return ""


def _main_thread_stack(dump: str, ident: int | None) -> str:
    """The main thread's section of a faulthandler dump (all threads are dumped)."""
    sections = [s for s in dump.split("\n\n") if "(most recent call first)" in s]
    tag = f"0x{ident:016x}" if ident else None
    for s in sections:
        if tag and tag in s.splitlines()[0]:
            return s
    return sections[-1] if sections else dump


def _stacks(procs, pending, dump_paths, board) -> tuple[dict, dict]:
    """Ask every unfinished rank for its stack (SIGUSR1 -> faulthandler), read the dumps."""
    for r in pending:
        if procs[r].is_alive():
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.3)
    stacks, where = {}, {}
    for r in sorted(pending):
        try:
            with open(dump_paths[r]) as f:
                dump = f.read()
        except OSError:
            dump = ""
        stacks[r] = (
            _main_thread_stack(dump, procs[r].ident_main) if dump else "(no stack: the process is gone)"
        )
        line = _innermost(stacks[r])
        waits = board.what(r) if board.since[r] else ""
        where[r] = ", ".join(x for x in (waits and f"waiting in {waits}", line and f"at {line}") if x)
    return stacks, where


def watch(procs, conns, board, dump_paths, limits, started) -> dict:
    """The parent's loop: collect every rank's result, or raise as soon as something is wrong."""
    results: dict[int, object] = {}
    pending = dict(enumerate(conns))
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    stop = {"signal": 0, "until": None}
    grace = limits["grace"]

    def on_signal(signum, frame):  # first signal: tell the ranks; a second one: stop now
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"], stop["until"] = signum, time.monotonic() + grace
        for r in pending:
            if procs[r].is_alive():
                os.kill(procs[r].pid, signum)

    handlers = {}
    if grace is not None and threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending:
            for obj in wait(list(pending.values()) + list(sentinels), timeout=_POLL):
                if obj in sentinels:  # a process exited; did it report first?
                    r = sentinels.pop(obj)
                    if r in pending and not pending[r].poll(0.5):
                        raise RankError(
                            r,
                            f"process exited with code {_exit_code(procs[r])} "
                            "without reporting (killed, or crashed in C code)",
                        )
                    continue
                r = next(k for k, c in pending.items() if c is obj)
                try:
                    status, data = obj.recv()
                except EOFError:
                    raise RankError(r, f"process died (exit code {_exit_code(procs[r])})") from None
                del pending[r]
                if status == "rendezvous":  # a process group that never formed: no fn has run
                    raise RendezvousFailed(r, data)
                if status == "err":
                    raise RankError(r, data)
                results[r] = pickle.loads(data)
            if pending:
                _check_progress(procs, pending, board, dump_paths, limits, started, stop)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return results


def _exit_code(proc) -> int | None:
    """A dead rank's exit code. Its pipe closes as it dies, a moment before the OS lets us reap it,
    so wait for that (briefly) instead of reading None."""
    proc.join(2.0)
    return proc.exitcode


def rendezvous_timeout(limits) -> timedelta:
    return timedelta(seconds=max(limits["timeout"], RENDEZVOUS_TIMEOUT))


def _check_progress(procs, pending, board, dump_paths, limits, started, stop) -> None:
    now = time.monotonic()
    if stop["until"] is not None and now > stop["until"]:
        raise KeyboardInterrupt(f"the ranks did not stop within {limits['grace']:g} s of the signal")
    # The clocks start when the last rank has connected: connecting is the launcher's business,
    # not the launched function's (a grader must not charge a slow machine to a student). Until
    # then only the rendezvous's own allowance applies (a rank stuck connecting is tried again).
    joined = list(board.joined)
    if not all(joined):
        if now - started > rendezvous_timeout(limits).total_seconds() + 5:
            raise RendezvousFailed(-1, f"the ranks did not connect within {now - started:.0f} s")
        return
    started = max(joined)
    if limits["deadline"] is not None and now - started > limits["deadline"]:
        stacks, where = _stacks(procs, pending, dump_paths, board)
        raise DeadlineExceeded(
            f"did not finish within {limits['deadline']:g} s; where each rank was:", stacks, where
        )
    if limits["progress_timeout"] is not None:
        stale = [r for r in pending if now - max(board.beat[r], started) > limits["progress_timeout"]]
        if stale:
            stacks, where = _stacks(procs, pending, dump_paths, board)
            raise DeadlineExceeded(
                f"rank {stale[0]} made no progress for {limits['progress_timeout']:g} s "
                "(no step finished); where each rank was:",
                stacks,
                where,
            )
    since = [board.since[r] for r in pending]
    if all(since) and now - max(since) > limits["deadlock_after"]:
        # All blocked at once can only be a slow collective if they all wait in the same one;
        # that case is left to the backend's timeout.
        whats = {board.what(r).split(" ", 1)[0] for r in pending}
        if len(whats) > 1 or any(w in ("send", "recv") for w in whats):
            stacks, where = _stacks(procs, pending, dump_paths, board)
            raise Deadlock(
                f"deadlock: every rank has been waiting for another for "
                f"{now - max(since):.1f} s, so none can proceed:",
                stacks,
                where,
            )
