"""On-disk formats of the stages' rows: Parquet shards, one row per prepared sequence.

- represent: ``SequenceRep``, a model's own tokens and top-k distributions (below);
- align: ``AlignedRow``, a source's distributions on the pivot's positions;
- fuse: ``FusedRow``, the distributions a target learns from.

A model's representation (its own tokenization of the prepared text):

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
k = 10 before compression. A shard is written to a temporary file, flushed to
disk and renamed, so a kill never leaves a torn ``shard-*.parquet``; after a power
loss one could still be short, which ``shard_problem`` finds (its Parquet footer
and row count) before the shard is trusted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
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

    lengths = [len(r.input_ids) for r in rows]
    k = rows[0].topk_ids.shape[1] if rows else 1
    cat = lambda name: np.concatenate([getattr(r, name) for r in rows]) if rows else np.zeros((0,))  # noqa: E731
    columns = {
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
    return write_table(path, columns, meta)


def shard_problem(path: Path, rows: int | None = None) -> str | None:
    """What is wrong with a shard file (missing, torn, not ``rows`` rows long), or None when it is whole."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        num_rows = pq.read_metadata(path).num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... by how the file is broken
        return f"not a whole Parquet file: {e}"
    if rows is not None and num_rows != rows:
        return f"{num_rows} rows where {rows} were written"
    return None


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
class AlignedRow:
    """One sequence of the align stage: a source's distributions on the pivot's positions.

    ``ids``/``probs``: (T, k) pivot ids and probabilities; ``status``: (T,) int8, how each
    position was filled (``fusechat.align.project``: aligned, one-hot, dropped, no target);
    the source's own cross-entropy on the assistant tokens, their count and bytes, and
    whether its logits were finite (what MinCE compares).
    """

    seq: int
    id: str
    ids: np.ndarray
    probs: np.ndarray
    status: np.ndarray
    source_ce: float
    source_tokens: int
    source_bytes: int
    source_finite: bool


@dataclass
class FusedRow:
    """One sequence of the fuse stage: the distributions the target learns from.

    ``in_loss``: (T,) bool, position t is in the fusion term; ``choice``: the chosen
    candidate (0 the pivot, j the j-th source of the set; the sequence out of the fusion
    loss: −1 no finite CE, −2 best CE above ``fuse.max_ce``); ``candidate_ce``: each candidate's comparable CE, in the order
    of the fuse manifest's ``candidates``.
    """

    seq: int
    id: str
    ids: np.ndarray
    probs: np.ndarray
    in_loss: np.ndarray
    choice: int
    candidate_ce: list[float]


def _dist_columns(rows: list, id_type) -> dict:
    import pyarrow as pa

    lengths = [len(r.ids) for r in rows]
    k = rows[0].ids.shape[1] if rows else 1
    return {
        "seq": pa.array([r.seq for r in rows], pa.int64()),
        "id": pa.array([r.id for r in rows], pa.string()),
        "ids": _list_of(np.concatenate([r.ids for r in rows]).astype(id_type), lengths, k),
        "probs": _list_of(np.concatenate([r.probs for r in rows]).astype(np.float16), lengths, k),
    }


def write_aligned_shard(path: Path, rows: list[AlignedRow], meta: dict, id_type=np.int32) -> int:
    import pyarrow as pa

    lengths = [len(r.ids) for r in rows]
    columns = {
        **_dist_columns(rows, id_type),
        "status": _list_of(np.concatenate([r.status for r in rows]).astype(np.int8), lengths),
        "source_ce": pa.array([r.source_ce for r in rows], pa.float64()),
        "source_tokens": pa.array([r.source_tokens for r in rows], pa.int64()),
        "source_bytes": pa.array([r.source_bytes for r in rows], pa.int64()),
        "source_finite": pa.array([r.source_finite for r in rows], pa.bool_()),
    }
    return write_table(path, columns, meta)


def write_fused_shard(path: Path, rows: list[FusedRow], meta: dict, id_type=np.int32) -> int:
    import pyarrow as pa

    lengths = [len(r.ids) for r in rows]
    columns = {
        **_dist_columns(rows, id_type),
        "in_loss": _list_of(np.concatenate([r.in_loss for r in rows]).astype(bool), lengths),
        "choice": pa.array([r.choice for r in rows], pa.int64()),
        "candidate_ce": pa.array([[float(c) for c in r.candidate_ce] for r in rows], pa.list_(pa.float64())),
    }
    return write_table(path, columns, meta)


def _read_dists(path: Path, per_position: str, scalars: tuple[str, ...]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    k = table.schema.field("ids").type.value_type.list_size
    ids, off = _nested(table.column("ids"), k)
    probs, _ = _nested(table.column("probs"), k)
    values, _ = _nested(table.column(per_position))
    cols = {n: table.column(n).to_pylist() for n in ("seq", "id", *scalars)}
    for i in range(table.num_rows):
        a, b = off[i], off[i + 1]
        yield {"ids": ids[a:b], "probs": probs[a:b], per_position: values[a:b], **{n: cols[n][i] for n in cols}}


def read_aligned(folder: str | os.PathLike) -> Iterator[AlignedRow]:
    """Every sequence of an align folder, in prepared-dataset order."""
    for _, path in sorted(shard_files(Path(folder)).items()):
        for row in _read_dists(path, "status", ("source_ce", "source_tokens", "source_bytes", "source_finite")):
            yield AlignedRow(**row)


def read_fused(folder: str | os.PathLike) -> Iterator[FusedRow]:
    """Every sequence of a fuse folder, in prepared-dataset order."""
    for _, path in sorted(shard_files(Path(folder)).items()):
        for row in _read_dists(path, "in_loss", ("choice", "candidate_ce")):
            yield FusedRow(**{**row, "in_loss": row["in_loss"].astype(bool)})


# ---------------------------------------------------------------- writing


def write_table(path: Path, columns: dict, meta: dict) -> int:
    """One Parquet shard from ``columns``, flushed to disk then renamed into place; its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a shard is whole or absent, even when the disk refuses it
        raise
    return path.stat().st_size


class ShardWriter:
    """Rows in, ``shard-NNNNN.parquet`` files of ``size`` rows out (the last one shorter) under ``folder``."""

    def __init__(self, folder: Path, size: int, write: Callable[[Path, list, dict], int]):
        self.folder, self.size, self.write = Path(folder), size, write
        self.rows: list = []
        self.shards = 0
        self.written: dict[str, int] = {}  # file name -> rows: the manifest's `shards`, checked on reading

    def add(self, row) -> None:
        self.rows.append(row)
        if len(self.rows) == self.size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.write(self.folder / shard_name(self.shards), self.rows, {"shard": self.shards})
            self.written[shard_name(self.shards)] = len(self.rows)
            self.rows, self.shards = [], self.shards + 1
