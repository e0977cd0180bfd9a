"""Streaming safetensors reading and writing, one tensor at a time.

The safetensors format is an 8-byte header length, a JSON header (name → dtype,
shape, byte range) and the raw bytes. Reading a tensor here is one ``seek`` +
``readinto`` into a fresh buffer (no memory map, whose touched pages would stay
resident and make a streaming merge look as large as its inputs); writing lays out
the header from the known shapes first and then appends each tensor's bytes as it
is produced, so the output never has to be held whole.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fusechat.errors import FusechatError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start = 8 + n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        a, b = spec["data_offsets"]
        out[name] = TensorInfo(name, spec["dtype"], tuple(spec["shape"]), path, start + a, start + b)
    return out


class ModelReader:
    """The tensors of a Hugging Face model folder (one safetensors file or an index of shards)."""

    def __init__(self, folder: str | os.PathLike, label: str):
        self.folder = Path(folder)
        self.label = label
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise FusechatError(f"{label}: shard {self.folder / missing[0]} named in {index} does not exist")
            self.tensors: dict[str, TensorInfo] = {}
            for f in files:
                self.tensors.update(read_header(self.folder / f))
        elif (self.folder / SINGLE).is_file():
            self.tensors = read_header(self.folder / SINGLE)
        else:
            raise FusechatError(f"{label}: {self.folder} holds no {SINGLE} and no {INDEX}")
        self._handles: dict[Path, object] = {}

    @property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.begin))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read whole (for small models: the analysis holds several in memory)."""
        return {n: self.get(n) for n in self.names}

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows ``[start, end)`` along the first dimension."""
        info = self.tensors[name]
        shape, begin, nbytes = info.shape, info.begin, info.nbytes
        if rows is not None:
            row_bytes = info.nbytes // shape[0]
            begin, nbytes = begin + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")
        buffer = bytearray(nbytes)
        handle.seek(begin)
        handle.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(shape)

    def row_chunks(self, name: str, max_elements: int) -> list[tuple[int, int]] | None:
        """Row ranges of at most ``max_elements`` elements each, or None when the tensor is small enough whole."""
        shape = self.tensors[name].shape
        numel = _numel(shape)
        if numel <= max_elements or len(shape) == 0 or shape[0] < 2:
            return None
        step = max(1, max_elements // max(1, numel // shape[0]))
        return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


class StreamingWriter:
    """Writes tensors in a planned order into shards of at most ``max_shard_bytes``.

    ``plan``: (name, dtype, shape) of every tensor, in the order ``write`` will be called.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of: dict[str, int] = {}
        self.headers = []
        for i, shard in enumerate(shards):
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                self.shard_of[name] = i
            self.headers.append(header)
        self.expected = [name for name, _, _ in plan]
        self.position = 0
        self.rows_written = 0
        self.current = -1
        self.handle = None
        self.total_size = sum(_numel(s) * torch.empty((), dtype=d).element_size() for _, d, s in plan)

    def write(self, name: str, tensor: torch.Tensor, part: bool = False) -> None:
        """Write a whole tensor, or (``part=True``) its next rows; tensors come in the planned order."""
        if name != self.expected[self.position]:
            raise RuntimeError(f"tensor {name} written out of the planned order (expected {self.expected[self.position]})")
        spec = self.headers[self.shard_of[name]][name]
        rows = spec["shape"][0] if spec["shape"] else 1
        got = list(tensor.shape)
        fits = got[1:] == spec["shape"][1:] and self.rows_written + got[0] <= rows if part else got == spec["shape"]
        if not fits or DTYPE_NAMES[tensor.dtype] != spec["dtype"]:
            raise RuntimeError(f"tensor {name}: {tuple(tensor.shape)} {tensor.dtype} does not match the plan")
        shard = self.shard_of[name]
        if shard != self.current:
            self._open(shard)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.rows_written += got[0] if part else rows
        if self.rows_written == rows:
            self.position += 1
            self.rows_written = 0

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        self.current = shard
        raw = json.dumps(self.headers[shard], separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.handle = open(self.folder / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(raw)))
        self.handle.write(raw)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.position != len(self.expected):
            raise RuntimeError(f"{len(self.expected) - self.position} planned tensors were never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self.files[i] for name, i in self.shard_of.items()}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_key(name: str) -> str:
    """The layer a tensor belongs to (``layer 3``), or its own name outside the repeated blocks."""
    m = LAYER_RE.search(name)
    return f"layer {int(m.group(1))}" if m else name


def module_type(name: str) -> str:
    """``self_attn.q_proj`` for ``model.layers.3.self_attn.q_proj.weight``."""
    m = LAYER_RE.search(name)
    rest = name[m.end():] if m else name
    return re.sub(r"\.(weight|bias)$", "", rest)
