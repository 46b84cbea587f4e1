"""A safetensors file read into one host buffer and viewed as tensors, without holding the GIL.

safetensors' `load(bytes)` copies every tensor out while holding the GIL (an 80 MB adapter held
it for 65 ms here, so the engine's step thread stood still while a loader thread read), and
`safe_open` maps the file (one truncated under the map would kill the process with SIGBUS). So a
loader reads the file into a uint8 tensor (the read releases the GIL), and this module checks the
format as the safetensors specification states it and returns views into that buffer:

    [8 bytes: N, little-endian u64][N bytes: JSON header][data]
    header: {"<name>": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ...,
             optional "__metadata__": {str: str}}

Checked: N fits the file and is at most MAX_HEADER; the header is a JSON object; each entry has a
known dtype, a shape of non-negative ints and offsets with end - begin = numel * itemsize; the
entries tile the data area exactly (no gaps, no overlaps, nothing after), as safetensors requires.
"""

from __future__ import annotations

import json

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 << 20


class SafetensorsFormatError(ValueError):
    pass


def as_buffer(data: bytes) -> torch.Tensor:
    """Bytes as the uint8 tensor parse_safetensors takes (a copy; empty bytes too)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def parse_safetensors(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: tensor} viewing `buf` (uint8 [file bytes]); raises SafetensorsFormatError."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(f"buf: expected a 1-d uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    size = buf.numel()
    if size < 8:
        raise SafetensorsFormatError(f"{size} bytes: shorter than the header length")
    n = int.from_bytes(bytes(buf[:8].tolist()), "little")
    if n > MAX_HEADER or 8 + n > size:
        raise SafetensorsFormatError(f"header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(bytes(buf[8:8 + n].numpy()).decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise SafetensorsFormatError(f"header is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    header.pop("__metadata__", None)
    base, data_bytes = 8 + n, size - 8 - n
    spans = []
    out = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry)
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise SafetensorsFormatError(f"{name}: {end - begin} bytes for shape {shape} of "
                                         f"{dtype}")
        if end > data_bytes:
            raise SafetensorsFormatError(f"{name}: data ends at {end}, past the file's "
                                         f"{data_bytes} data bytes")
        spans.append((begin, end, name))
        out[name] = _view(buf[base + begin: base + end], dtype, shape)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsFormatError(f"{name}: data at {begin}, expected {position} (gap "
                                         "or overlap)")
        position = end
    if position != data_bytes:
        raise SafetensorsFormatError(f"the tensors cover {position} of {data_bytes} data bytes")
    return out


def _entry(name: str, entry: object) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"{name}: entry is not an object")
    name_of_dtype = entry.get("dtype")
    dtype = DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise SafetensorsFormatError(f"{name}: unsupported dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(_nat(d) for d in shape)):
        raise SafetensorsFormatError(f"{name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nat(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsFormatError(f"{name}: data_offsets {offsets!r}")
    return dtype, shape, offsets[0], offsets[1]


def _nat(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def _view(raw: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The bytes as a tensor of `dtype` (copied when not aligned for it: old writers did not
    pad the header); little-endian, as the format and every host torch runs on are."""
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(shape)
