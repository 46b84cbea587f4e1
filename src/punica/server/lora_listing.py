"""`GET /v1/lora_adapters`: the adapter folders below the just-in-time root (`--lora-root`), by
the names requests use as `model`, each marked `loaded` when the engine holds it.

A folder is listed when a request could name it: its name (relative path, at most MAX_DEPTH
parts, such as org/team/name) is a valid adapter name, it holds adapter_config.json, and it
resolves below the root (`jit_path`: links leading out of the root are neither listed nor
entered). The scan is bounded (MAX_ADAPTERS names, MAX_SCANNED directory entries; past either the
answer says `truncated`; the scan goes breadth first, so the names it lists then are the
shallowest), runs on a worker thread, and one scan runs at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from punica.lora.registry import jit_path
from punica.server.protocol import ADAPTER_NAME

MAX_DEPTH = 3
"""Most parts of a listed name (org/team/name)."""
MAX_ADAPTERS = 10_000
"""Most names one listing returns."""
MAX_SCANNED = 100_000
"""Most directory entries one listing looks at (a root of many other files stays cheap)."""


@dataclass(frozen=True)
class RootListing:
    names: list[str]
    """Adapter names below the root, sorted."""
    truncated: bool
    """Whether a bound stopped the scan (more folders may be there)."""


def scan_root(root: str, max_depth: int = MAX_DEPTH, max_adapters: int = MAX_ADAPTERS,
              max_scanned: int = MAX_SCANNED) -> RootListing:
    """The adapter folders below `root` (blocking: call it off the event loop)."""
    base = Path(root).resolve()
    names: list[str] = []
    budget = max_scanned
    truncated = False
    queue: deque[tuple[Path, str, int]] = deque([(base, "", 1)])  # folder, name + "/", depth
    while queue and not truncated:
        folder, prefix, depth = queue.popleft()
        try:
            with os.scandir(folder) as it:
                entries = list(itertools.islice(it, budget + 1))
        except OSError:
            continue  # unreadable (or gone meanwhile): nothing listed from it
        if len(entries) > budget:
            entries, truncated = entries[:budget], True
        budget -= len(entries)
        for entry in sorted(entries, key=lambda e: e.name):
            name = prefix + entry.name
            if not ADAPTER_NAME.fullmatch(name) or not _inside(entry, base):
                continue  # (no name below an invalid one is valid either)
            if jit_path(str(base), name) is not None:
                if len(names) == max_adapters:
                    truncated = True
                    break
                names.append(name)
            if depth < max_depth:
                queue.append((Path(entry.path), name + "/", depth + 1))
    return RootListing(sorted(names), truncated)


def _inside(entry: os.DirEntry, base: Path) -> bool:
    """Whether a directory entry is a folder that resolves below `base` (a link is followed)."""
    try:
        if not entry.is_dir():
            return False
        return not entry.is_symlink() or base in Path(entry.path).resolve().parents
    except (OSError, RuntimeError, ValueError):
        return False


class RootLister:
    """The listing route's work: one scan at a time, on a worker thread."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def listing(self, root: str, loaded: set[str], base_name: str) -> dict:
        """OpenAI-style list of the adapters below `root`; the base model's name is left out (a
        request naming it gets the base model)."""
        async with self._lock:
            found = await asyncio.to_thread(scan_root, root)
        data = [{"id": n, "object": "lora_adapter", "loaded": n in loaded}
                for n in found.names if n != base_name]
        return {"object": "list", "data": data, "truncated": found.truncated}
