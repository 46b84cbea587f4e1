"""parse_safetensors against the safetensors library: the same tensors for files it writes, and a
SafetensorsFormatError (never another exception) for every malformed file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from punica.lora.safetensors_buffer import (
    SafetensorsFormatError,
    as_buffer,
    parse_safetensors,
)


def _buf(data: bytes) -> torch.Tensor:
    return as_buffer(data)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(3, 5, generator=g).half(),
        "b.lora_B.weight": torch.randn(7, 2, generator=g).bfloat16(),
        "c": torch.randn(4, generator=g),
        "d": torch.randint(-9, 9, (2, 2, 2), generator=g),
        "e": torch.rand(3, generator=g) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


@pytest.mark.parametrize("seed", range(3))
def test_files_the_library_writes_parse_to_the_same_tensors(seed: int) -> None:
    tensors = _tensors(seed)
    data = save(tensors, metadata={"format": "pt"})
    ours, theirs = parse_safetensors(_buf(data)), load(data)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        assert torch.equal(ours[name], t)


def _file(header: dict, data: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


def test_every_truncation_is_a_format_error() -> None:
    data = save({"x": torch.arange(6, dtype=torch.float32)})
    for cut in range(len(data)):
        with pytest.raises(SafetensorsFormatError):
            parse_safetensors(_buf(data[:cut]))


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"x": F32}, bytes(12), "cover 8 of 12"),  # trailing bytes
    ({"x": F32, "y": {**F32, "data_offsets": [12, 20]}}, bytes(20), "expected 8"),  # a gap
    ({"x": F32, "y": {**F32, "data_offsets": [4, 12]}}, bytes(12), "expected 8"),  # overlap
    ({"x": {**F32, "dtype": "F8_E9"}}, bytes(8), "unsupported dtype"),
    ({"x": {**F32, "shape": [2, -1]}}, bytes(8), "shape"),
    ({"x": {**F32, "shape": [True]}}, bytes(8), "shape"),
    ({"x": {**F32, "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    ({"x": {**F32, "shape": [3]}}, bytes(8), "8 bytes for shape"),
    ({"x": [1, 2]}, bytes(8), "not an object"),
    ({"x": {**F32, "dtype": []}}, bytes(8), "unsupported dtype"),
    ({"x": {**F32, "shape": [0, 1 << 70]}}, bytes(8), "shape"),
])
def test_malformed_headers_are_refused(header: dict, data: bytes, why: str) -> None:
    with pytest.raises(SafetensorsFormatError, match=why):
        parse_safetensors(_buf(_file(header, data)))


def test_a_header_that_is_no_json_object_or_too_long_is_refused() -> None:
    for raw, why in ((b"[1, 2]", "not a JSON object"), (b"{oops", "not JSON"),
                     (b"\xff\xfe", "not JSON"), (b"[" * 200_000, "not JSON"),
                     (b'{"x": ' + b"9" * 5000 + b"}", "not JSON")):
        with pytest.raises(SafetensorsFormatError, match=why):
            parse_safetensors(_buf(struct.pack("<Q", len(raw)) + raw))
    with pytest.raises(SafetensorsFormatError, match="does not fit"):
        parse_safetensors(_buf(struct.pack("<Q", 1 << 40) + b"{}"))


def test_an_unaligned_header_still_reads_its_tensors() -> None:
    x = torch.arange(3, dtype=torch.float32)
    header = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    for pad in range(4):  # 8 + len(header) + pad lands on every residue mod 4
        got = parse_safetensors(_buf(_file(header, x.numpy().tobytes(), pad)))
        assert torch.equal(got["x"], x)
