"""Reading an adapter's files safely, and checking its config's regular expressions.

Every file is read through one descriptor after its path resolved below the adapter root (when
there is one) and proved a regular file: a symlink out of the root, a FIFO or a device is never
opened for reading. Each read records the file's stamp (size, mtime), so that a later re-read can
tell the files changed. PEFT pattern tables (alpha_pattern, rank_pattern) are regexes matched on
the engine's thread: ones that can backtrack for long are refused.
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.errors import AdapterLoadError

MAX_FILE_BYTES = 16 << 30
"""The largest adapter file read (a rank-64 adapter of a 70B model is about 1.7 GB)."""


def fail(path: Path, why: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter at {path}: {why}")


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of an adapter file: size and modification time."""

    name: str
    size: int
    mtime_ns: int


def read_file(path: Path, name: str, root: Path | None, as_tensor: bool = False,
              into: Callable[[int], torch.Tensor] | None = None
              ) -> tuple[bytes | torch.Tensor, FileStamp] | None:
    """The bytes of `path / name` and their stamp (None: no such file); with `as_tensor`, in a
    uint8 tensor (read with the GIL released: no Python object of the file's size is made),
    `into(size)` when given (e.g. `read_buffer.scratch`), else a new one.
    The file must resolve below `root` (when given; symlinks are followed, then checked) and be
    a regular file: a link out of the root, a FIFO or a device is refused, never opened."""
    target = path / name
    if not os.path.lexists(target):
        return None
    try:
        real = target.resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise fail(path, f"{name} cannot be resolved ({err.__class__.__name__})") from err
    if root is not None and root not in real.parents:
        raise fail(path, f"{name} resolves outside the adapter root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise fail(path, f"{name} cannot be opened ({err.strerror})") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail(path, f"{name} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise fail(path, f"{name} is {st.st_size} bytes, more than {MAX_FILE_BYTES}")
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            data = _read_tensor(f, st.st_size, into) if as_tensor else f.readall()
        if len(data) != st.st_size:
            raise fail(path, f"{name} changed size while it was read")
    except OSError as err:
        raise fail(path, f"{name} cannot be read ({err.strerror})") from err
    finally:
        os.close(fd)
    return data, FileStamp(name, st.st_size, st.st_mtime_ns)


READ_CHUNK = 8 << 20
"""Files larger than two chunks are read in chunks of at least this size, READ_STREAMS at once
(a disk serves a queue of reads faster than one sequential stream)."""
READ_STREAMS = 8
_read_pool: concurrent.futures.ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def _reader() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of chunk readers (its tasks hold no state: one pread each)."""
    global _read_pool
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = concurrent.futures.ThreadPoolExecutor(
                READ_STREAMS, thread_name_prefix="punica-lora-read")
        return _read_pool


def _read_tensor(f: io.RawIOBase, size: int,
                 into: Callable[[int], torch.Tensor] | None) -> torch.Tensor:
    """The file's `size` bytes in a uint8 tensor (shorter when it ended early)."""
    buf = into(size) if into is not None else torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    if size <= 2 * READ_CHUNK:
        got = _pread(f.fileno(), view, 0)
        return buf if got == size else buf[:got]
    streams = min(READ_STREAMS, size // READ_CHUNK)
    bounds = [size * k // streams for k in range(streams + 1)]
    parts = [_reader().submit(_pread, f.fileno(), view[a:b], a)
             for a, b in itertools.pairwise(bounds)]
    concurrent.futures.wait(parts)  # every chunk done before the descriptor can be closed
    got = [part.result() for part in parts]  # each raises its OSError here
    if got != [b - a for a, b in itertools.pairwise(bounds)]:
        return buf[:sum(got)]  # the file ended early: the caller sees the size change
    return buf


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """Read into all of `view` from `offset` (the GIL released); bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            break
        got += n
    return got


def stamps_of(path: Path, names: tuple[str, ...] = ("adapter_config.json",
              "adapter_model.safetensors", "adapter_model.bin")) -> tuple[FileStamp, ...]:
    """The stamps of an adapter's files as they are on disk now (no file is read)."""
    out = []
    for name in names:
        try:
            st = os.stat(path / name)
        except OSError:
            continue
        out.append(FileStamp(name, st.st_size, st.st_mtime_ns))
    return tuple(out)


MAX_PATTERNS, MAX_PATTERN_CHARS, MAX_REPEATS = 4096, 256, 3
"""Bounds of an alpha_pattern / rank_pattern: entries, characters per regex, and unbounded
repeats per regex (a module name is short, but k repeats in a row can take n^k steps)."""


def _backtracks(tree: object) -> bool:
    """Whether a parsed regex repeats something that itself repeats or branches (the shapes
    whose matching can take exponential time: (a+)+, (a|a)*)."""
    from re import _constants as c
    from re import _parser

    def inner(items: object, under_repeat: bool) -> bool:
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                if under_repeat or inner(arg[2], True):
                    return True
            elif op is c.BRANCH:
                if under_repeat or any(inner(b, under_repeat) for b in arg[1]):
                    return True
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                if inner(arg[-1], under_repeat):
                    return True
            elif op in (c.ASSERT, c.ASSERT_NOT) and inner(arg[1], under_repeat):
                return True
        return False

    def repeats(items: object) -> int:  # unbounded repeats anywhere: a.*b.*c.* is O(n^3)
        n = 0
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                n += (arg[1] == c.MAXREPEAT) + repeats(arg[2])
            elif op is c.BRANCH:
                n += sum(repeats(b) for b in arg[1])
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                n += repeats(arg[-1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                n += repeats(arg[1])
        return n

    return isinstance(tree, _parser.SubPattern) and (inner(tree, False) or
                                                     repeats(tree) > MAX_REPEATS)


def patterns(path: Path, cfg: dict, key: str, value_ok: object) -> dict[re.Pattern, object]:
    """A PEFT pattern table, each regex checked: valid, short, and without nested repeats or
    repeated alternations (matched on the engine's thread, a regex must not backtrack for
    long: `(a+)+$` is refused)."""
    from re import _parser

    raw = cfg.get(key) or {}
    if not isinstance(raw, dict) or len(raw) > MAX_PATTERNS:
        raise fail(path, f"{key}: expected an object of at most {MAX_PATTERNS} entries")
    out = {}
    for pattern, value in raw.items():
        if not value_ok(value):
            raise fail(path, f"{key}[{pattern!r}]: invalid value {value!r}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise fail(path, f"{key}: a pattern of {len(pattern)} characters (at most "
                              f"{MAX_PATTERN_CHARS})")
        try:
            if _backtracks(_parser.parse(pattern)):
                raise fail(path, f"{key}: {pattern!r} repeats a repetition or an alternation, "
                                  f"or has more than {MAX_REPEATS} unbounded repeats (it could "
                                  "take very long to match)")
            out[re.compile(rf"(?:^|\.){pattern}$")] = value
        except (re.error, RecursionError, OverflowError) as err:
            raise fail(path, f"{key}: {pattern!r} is not a valid regular expression "
                              f"({err})") from err
    return out
