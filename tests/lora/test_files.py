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
