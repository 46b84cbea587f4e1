"""Adapter files: regular files below the root only, stamps, and pattern regexes that cannot
backtrack for long."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from punica.errors import AdapterLoadError
from punica.lora.files import patterns, read_file, stamps_of


@pytest.mark.parametrize("pattern,ok", [
    ("q_proj", True), (r"layers\.\d+\.self_attn\.q_proj", True), (r"layers\.(0|1)\.q", True),
    ("[ab]{2,5}", True), ("a.*b.*c.*", True),
    ("(.|.)*!", False), ("(a+)+$", False), ("(x*)*", False), (".*.*.*.*x", False),
    ("(unclosed", False), ("x" * 300, False),
])
def test_pattern_tables(pattern: str, ok: bool) -> None:
    cfg = {"alpha_pattern": {pattern: 8}}
    if ok:
        assert list(patterns(Path("a"), cfg, "alpha_pattern", lambda v: True).values()) == [8]
    else:
        with pytest.raises(AdapterLoadError, match="alpha_pattern"):
            patterns(Path("a"), cfg, "alpha_pattern", lambda v: True)


def test_read_file_below_the_root_regular_only(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside.json"
    (root / "a").mkdir(parents=True)
    outside.write_text("{}")
    (root / "a" / "ok.json").write_text("[1]")
    (root / "a" / "link.json").symlink_to(outside)
    os.mkfifo(root / "a" / "fifo.json")
    data, stamp = read_file(root / "a", "ok.json", root.resolve())
    assert data == b"[1]" and stamp.size == 3 and stamps_of(root / "a", ("ok.json",)) == (stamp,)
    assert read_file(root / "a", "missing.json", root.resolve()) is None
    with pytest.raises(AdapterLoadError, match="outside the adapter root"):
        read_file(root / "a", "link.json", root.resolve())
    with pytest.raises(AdapterLoadError, match="not a regular file"):
        read_file(root / "a", "fifo.json", root.resolve())
    assert read_file(root / "a", "link.json", None)[0] == b"{}"  # no root: operator's paths


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 9000, 65_537])
def test_chunked_reads_return_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       size: int) -> None:
    """Files past two chunks are read in parallel chunks (tiny chunks here): the bytes are the
    file's, into a fresh tensor or a thread's scratch buffer, and a chunk that comes back short
    (the file shrank) is a size change, never a buffer with stale bytes in it."""
    import torch

    from punica.lora import files
    from punica.lora.read_buffer import scratch

    monkeypatch.setattr(files, "READ_CHUNK", 2048)
    data = os.urandom(size)
    (tmp_path / "w.bin").write_bytes(data)
    for into in (None, scratch):
        got, stamp = read_file(tmp_path, "w.bin", tmp_path.parent, as_tensor=True, into=into)
        assert isinstance(got, torch.Tensor) and bytes(got.numpy()) == data
        assert stamp.size == size
    if size > 2 * 2048:
        real = files._pread
        monkeypatch.setattr(files, "_pread", lambda fd, view, offset: real(
            fd, view[:-1] if offset else view, offset))
        with pytest.raises(AdapterLoadError, match="changed size while it was read"):
            read_file(tmp_path, "w.bin", None, as_tensor=True)
