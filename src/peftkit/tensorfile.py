"""What a safetensors file holds (names, dtypes, shapes), read from its header with the standard library alone.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' bytes. ``peftkit inspect`` needs only
the header, so it reads that without torch, numpy or the safetensors package (whose import alone is most of a
second with torch). The checks are the ones safetensors makes before it hands out a tensor (header size, UTF-8
JSON object, offsets that tile the data exactly, byte counts that match dtype × shape), so a file this reader
accepts is one ``safetensors.safe_open`` opens, and a corrupt one is refused here as there.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, NamedTuple

from . import fsutil
from .errors import AdapterFileError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
# bits per element of every dtype safetensors knows
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class TensorInfo(NamedTuple):
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: list[int]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuse a FIFO, device or folder where a file should be: reading a FIFO would block forever."""
    kind = fsutil.not_regular(path)
    if kind is not None:
        raise AdapterFileError(f"{os.fspath(path)!r} is {kind}, not a regular file; replace it with the saved file")


def _problem(header: Any, data_bytes: int) -> str | None:
    """Why ``header`` (the parsed JSON) does not describe ``data_bytes`` bytes of tensors, or None."""
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                return "__metadata__ must map strings to strings"
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            return f"tensor {name!r} lacks dtype, shape or data_offsets"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS:
            return f"tensor {name!r} has an unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {name!r} has an invalid shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            return f"tensor {name!r} has invalid data_offsets {offsets!r}"
        bits = TensorInfo(dtype, shape).numel * DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            return f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {bits / 8:g}"
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return f"tensor {name!r} starts at byte {begin}, not at {end} (offsets must tile the data)"
        end = stop
    if end != data_bytes:
        return f"the tensors cover {end} bytes but the file holds {data_bytes} after the header"
    return None


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, sorted by name (as ``safe_open().keys()``), after
    the checks safetensors makes; a corrupt file is one :class:`AdapterFileError` line."""
    path = os.fspath(path)
    require_regular_file(path)

    def corrupt(why: str) -> AdapterFileError:
        return AdapterFileError(f"{path} is not a valid safetensors file ({why}); the file is corrupt")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise corrupt(f"a header of {n} bytes, over safetensors' limit of {MAX_HEADER_BYTES}")
            if 8 + n > size:
                raise corrupt(f"a header of {n} bytes in a file of {size}")
            raw = fh.read(n)
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise corrupt("the header does not start with '{'")
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise corrupt(f"the header is not JSON in UTF-8: {str(exc).splitlines()[0][:120]}") from None
    if (why := _problem(header, size - 8 - n)) is not None:
        raise corrupt(why)
    return {name: TensorInfo(header[name]["dtype"], list(header[name]["shape"]))
            for name in sorted(header) if name != "__metadata__"}
