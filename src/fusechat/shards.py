"""On-disk format of a model's representation: Parquet shards of top-k distributions.

One row per prepared sequence (the model's own tokenization of its text):

| column | type | shape |
|---|---|---|
| ``seq`` | int64 | row index in the prepared dataset |
| ``id`` | string | |
| ``input_ids`` | uint16 or int32 list | (T,) |
| ``offsets`` | int32 [2] list | (T, 2) character spans in the *prepared* text |
| ``assistant_mask`` | bool list | (T,) token overlaps an assistant span |
| ``topk_ids`` | uint16 or int32 [k] list | (T, k) position i predicts token i + 1 |
| ``topk_logits`` | float16 [k] list | (T, k) descending |
| ``ce`` | float32 | mean cross-entropy over assistant target tokens |
| ``assistant_tokens`` | int32 | number of those targets |
| ``assistant_bytes`` | int32 | UTF-8 bytes of the assistant spans (the same for every model) |
| ``finite`` | bool | logits and CE finite |

Ids are uint16 when the vocabulary fits, so that a token costs about 45 bytes at
k = 10 before compression. A shard's counts live in its Parquet metadata, so a
shard file is complete exactly when it exists (it is written then renamed).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
META_KEY = b"fusechat"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


@dataclass
class SequenceRep:
    """One sequence's representation, as numpy arrays."""

    seq: int
    id: str
    input_ids: np.ndarray  # (T,)
    offsets: np.ndarray  # (T, 2)
    assistant_mask: np.ndarray  # (T,) bool
    topk_ids: np.ndarray  # (T, k)
    topk_logits: np.ndarray  # (T, k) float16
    ce: float
    assistant_tokens: int
    assistant_bytes: int
    finite: bool


def _list_of(flat: np.ndarray, lengths: list[int], width: int | None = None):
    import pyarrow as pa

    values = pa.array(flat.reshape(-1))
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def write_shard(path: Path, rows: list[SequenceRep], meta: dict) -> int:
    """Write rows as one Parquet shard, atomically; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = [len(r.input_ids) for r in rows]
    k = rows[0].topk_ids.shape[1] if rows else 1
    cat = lambda name: np.concatenate([getattr(r, name) for r in rows]) if rows else np.zeros((0,))  # noqa: E731
    table = pa.table(
        {
            "seq": pa.array([r.seq for r in rows], pa.int64()),
            "id": pa.array([r.id for r in rows], pa.string()),
            "input_ids": _list_of(cat("input_ids"), lengths),
            "offsets": _list_of(cat("offsets").astype(np.int32), lengths, 2),
            "assistant_mask": _list_of(cat("assistant_mask").astype(bool), lengths),
            "topk_ids": _list_of(cat("topk_ids"), lengths, k),
            "topk_logits": _list_of(cat("topk_logits").astype(np.float16), lengths, k),
            "ce": pa.array([r.ce for r in rows], pa.float32()),
            "assistant_tokens": pa.array([r.assistant_tokens for r in rows], pa.int32()),
            "assistant_bytes": pa.array([r.assistant_bytes for r in rows], pa.int32()),
            "finite": pa.array([r.finite for r in rows], pa.bool_()),
        }
    ).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path.stat().st_size


def shard_meta(path: Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_metadata(path).metadata[META_KEY])


def shard_files(folder: Path) -> dict[int, Path]:
    """Complete shard files of a representation folder, by shard index."""
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): folder / m.group(0) for f in os.listdir(folder) if (m := SHARD_RE.match(f))}


def _nested(column, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, row offsets) of a list column; fixed-size inner lists reshaped to (N, width)."""
    col = column.combine_chunks()
    values = col.values
    if width is not None:
        values = values.values
    flat = values.to_numpy(zero_copy_only=False)
    if width is not None:
        flat = flat.reshape(-1, width)
    return flat, col.offsets.to_numpy()


def read_shard(path: Path) -> Iterator[SequenceRep]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    k = table.schema.field("topk_ids").type.value_type.list_size
    ids, off = _nested(table.column("input_ids"))
    offsets, _ = _nested(table.column("offsets"), 2)
    mask, _ = _nested(table.column("assistant_mask"))
    topk_ids, _ = _nested(table.column("topk_ids"), k)
    topk_logits, _ = _nested(table.column("topk_logits"), k)
    scalars = {name: table.column(name).to_pylist() for name in
               ("seq", "id", "ce", "assistant_tokens", "assistant_bytes", "finite")}
    for i in range(table.num_rows):
        a, b = off[i], off[i + 1]
        yield SequenceRep(
            seq=scalars["seq"][i], id=scalars["id"][i], input_ids=ids[a:b], offsets=offsets[a:b],
            assistant_mask=mask[a:b].astype(bool), topk_ids=topk_ids[a:b], topk_logits=topk_logits[a:b],
            ce=scalars["ce"][i], assistant_tokens=scalars["assistant_tokens"][i],
            assistant_bytes=scalars["assistant_bytes"][i], finite=scalars["finite"][i],
        )


def read_representation(folder: str | os.PathLike) -> Iterator[SequenceRep]:
    """Every sequence of a representation folder, in prepared-dataset order."""
    for _, path in sorted(shard_files(Path(folder)).items()):
        yield from read_shard(path)


# ---------------------------------------------------------------- distributions on pivot positions


@dataclass
class DistRow:
    """Sparse distributions at every pivot position of one sequence (align and fuse output).

    ``ids``/``probs``: (T, k) pivot ids and probabilities; ``status``: (T,) int8,
    whose meaning the writing stage defines; ``extra``: per-sequence scalars.
    """

    seq: int
    id: str
    ids: np.ndarray
    probs: np.ndarray
    status: np.ndarray
    extra: dict


def write_dist_shard(path: Path, rows: list[DistRow], meta: dict, id_type=np.int32) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = [len(r.status) for r in rows]
    k = rows[0].ids.shape[1] if rows else 1
    columns = {
        "seq": pa.array([r.seq for r in rows], pa.int64()),
        "id": pa.array([r.id for r in rows], pa.string()),
        "ids": _list_of(np.concatenate([r.ids for r in rows]).astype(id_type), lengths, k),
        "probs": _list_of(np.concatenate([r.probs for r in rows]).astype(np.float16), lengths, k),
        "status": _list_of(np.concatenate([r.status for r in rows]).astype(np.int8), lengths),
    }
    for name in rows[0].extra if rows else ():
        columns[name] = pa.array([r.extra[name] for r in rows])
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path.stat().st_size


def read_dist_shard(path: Path) -> Iterator[DistRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    k = table.schema.field("ids").type.value_type.list_size
    ids, off = _nested(table.column("ids"), k)
    probs, _ = _nested(table.column("probs"), k)
    status, _ = _nested(table.column("status"))
    extra_names = [n for n in table.column_names if n not in ("seq", "id", "ids", "probs", "status")]
    scalars = {n: table.column(n).to_pylist() for n in ("seq", "id", *extra_names)}
    for i in range(table.num_rows):
        a, b = off[i], off[i + 1]
        yield DistRow(seq=scalars["seq"][i], id=scalars["id"][i], ids=ids[a:b], probs=probs[a:b],
                      status=status[a:b], extra={n: scalars[n][i] for n in extra_names})


def read_dists(folder: str | os.PathLike) -> Iterator[DistRow]:
    for _, path in sorted(shard_files(Path(folder)).items()):
        yield from read_dist_shard(path)
