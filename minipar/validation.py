"""One validation layer: every configuration is checked before any rank starts.

A bad input must end as a message, never as a traceback from inside a rank 30 seconds
later. The rules live beside what they protect (each strategy's `check_*` function states
why its rule holds); this module gives them one vocabulary and one way out:

    p = Problems(cli=True)              # names print as flags: --top-k
    p.integer("heads", heads, low=1)    # each check adds one line saying how to fix it
    p.divides("tp", tp, "heads", heads)
    p.output_dir("out", path)           # refused unless it can be created and written
    p.raise_if_any()                    # ConfigError (a ValueError) listing every problem

Python entry points (`launch`, `Mesh`, the `train_*` functions, `plan.estimate`) raise the
`ConfigError`; command lines call `exit_on_error(main)` and turn it into one line per
problem on stderr and exit code 2 (argparse's own convention for bad usage).

Values that argparse could not convert arrive as `Invalid` (see `Int`, `Float`), so that a
command line with three mistakes is told about all three at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "Problems",
    "Invalid",
    "Int",
    "Float",
    "ArgumentParser",
    "exit_on_error",
    "nearest_existing",
    "writable_dir_problem",
    "free_memory_bytes",
]


class ConfigError(ValueError):
    """A configuration that cannot run. `problems` holds one line per problem."""

    def __init__(self, problems: list[str], what: str = "this configuration cannot run"):
        self.problems = list(problems)
        super().__init__(what + ":\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class Invalid:
    """A command-line value that did not convert (kept so that every problem is listed)."""

    text: str
    kind: str

    def __repr__(self) -> str:
        return repr(self.text)


def Int(text: str):
    """argparse type: an int, or Invalid (never raises)."""
    try:
        return int(text)
    except ValueError:
        return Invalid(text, "a whole number")


def Float(text: str):
    """argparse type: a finite float, or Invalid (never raises)."""
    try:
        x = float(text)
    except ValueError:
        return Invalid(text, "a number")
    return x if x == x and abs(x) != float("inf") else Invalid(text, "a finite number")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our exit convention: an unknown flag or a missing value is one line and exit 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


class Problems:
    """Collects problems, one line each. `cli=True` names fields as flags (`top_k` -> `--top-k`)."""

    def __init__(self, cli: bool = False):
        self.cli, self.items = cli, []

    def name(self, field: str) -> str:
        return "--" + field.replace("_", "-") if self.cli else field

    def show(self, field: str, value) -> str:
        """How a field and its value read in a message: `--heads 0` or `heads=0`."""
        return f"{self.name(field)} {value!r}" if self.cli else f"{field}={value!r}"

    def add(self, message: str) -> None:
        self.items.append(message)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items)

    # ---- single values
    def integer(self, field: str, value, low: int | None = 1, high: int | None = None, why: str = "") -> bool:
        """An int within [low, high]; `why` says what the bound protects."""
        if isinstance(value, Invalid) or not _is_int(value):
            self.add(f"{self.show(field, value)} must be a whole number" + _range(low, high))
            return False
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(
                f"{self.show(field, value)} must be"
                + _range(low, high).replace(",", "", 1)
                + (f": {why}" if why else "")
            )
            return False
        return True

    def number(
        self,
        field: str,
        value,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        why: str = "",
    ) -> bool:
        """A finite number within [low, high] (or (low, high] with low_open)."""
        if isinstance(value, Invalid) or not _is_number(value):
            self.add(f"{self.show(field, value)} must be a finite number")
            return False
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            lo = f"> {low}" if low_open else f">= {low}"
            rng = " and ".join(
                s for s in ((lo if low is not None else ""), (f"<= {high}" if high is not None else "")) if s
            )
            self.add(f"{self.show(field, value)} must be {rng}" + (f": {why}" if why else ""))
            return False
        return True

    def choice(self, field: str, value, choices) -> bool:
        if value not in tuple(choices):
            self.add(f"{self.show(field, value)} is not one of: {', '.join(map(str, choices))}")
            return False
        return True

    def divides(self, field: str, divisor, of_field: str, value, why: str = "") -> bool:
        """`value` of `of_field` must be a multiple of `divisor` (both already checked >= 1)."""
        if _is_int(divisor) and _is_int(value) and divisor >= 1 and value % divisor:
            below, above = value // divisor * divisor, (value // divisor + 1) * divisor
            near = f"{below} or {above}" if below else f"{above}"
            self.add(
                f"{self.show(of_field, value)} must be divisible by {self.name(field)}={divisor} (try {near})"
                + (f": {why}" if why else "")
            )
            return False
        return True

    # ---- paths
    def output_dir(self, field: str, path) -> bool:
        """A directory we will create or write into: refused unless that can succeed."""
        problem = writable_dir_problem(path)
        if problem:
            self.add(f"{self.show(field, path)}: {problem}")
        return not problem

    def output_file(self, field: str, path) -> bool:
        """A file we will write (its parent directory is created if missing)."""
        if not isinstance(path, str) or not path:
            self.add(f"{self.show(field, path)}: give a file path")
            return False
        if os.path.isdir(path):
            self.add(f"{self.show(field, path)} is a directory; give a file path inside it")
            return False
        problem = writable_dir_problem(os.path.dirname(os.path.abspath(path)))
        if problem:
            self.add(f"{self.show(field, path)}: {problem}")
        return not problem

    def input_dir(self, field: str, path) -> bool:
        if not isinstance(path, str) or not os.path.isdir(path):
            self.add(f"{self.show(field, path)}: no such directory")
            return False
        return True

    # ---- composition
    def merge(self, check, *args, **kwargs) -> bool:
        """Run another check that raises ConfigError (or ValueError); keep its lines."""
        try:
            check(*args, **kwargs)
        except ConfigError as e:
            self.items += e.problems
            return False
        except ValueError as e:  # a multi-line message lists its problems as "  - ..." lines
            lines = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith("- ")]
            self.items += lines or [str(e)]
            return False
        return True

    def raise_if_any(self, what: str = "this configuration cannot run") -> None:
        if self.items:
            raise ConfigError(self.items, what)


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f", between {low} and {high}"
    if low is not None:
        return f", >= {low}"
    if high is not None:
        return f", <= {high}"
    return ""


def nearest_existing(path: str) -> str:
    """The deepest existing ancestor of `path` (itself if it exists)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def writable_dir_problem(path) -> str | None:
    """Why `path` cannot be made into a writable directory, or None. Creates nothing: it
    writes one temporary file into the nearest existing ancestor (permission bits alone
    would lie to root, and read-only mounts ignore them)."""
    if not isinstance(path, str) or not path:
        return "give a directory path"
    base = nearest_existing(path)
    if not os.path.isdir(base):
        return f"{base} is a file, so no directory can be made under it; choose another path"
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".minipar-probe-"):
            pass
    except OSError as e:
        return f"cannot write in {base} ({e.strerror or e}); choose a writable path"
    return None


def free_memory_bytes() -> int | None:
    """Memory available to new processes on this machine (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def exit_on_error(main):
    """Wrap a command line's `main(argv) -> int`: a ConfigError prints one line per problem
    on stderr and returns 2, with no traceback."""

    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except ConfigError as e:
            for line in e.problems:
                print(f"error: {line}", file=sys.stderr)
            return 2

    wrapped.__wrapped__ = main
    wrapped.__doc__ = main.__doc__
    return wrapped
