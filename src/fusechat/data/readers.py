"""Reading raw records from JSON, JSONL, saved Hugging Face datasets and hub datasets.

``iter_records`` yields ``(where, record)`` where ``record`` is the parsed JSON
value or a ``BadRecord`` for a line that could not be read (bad UTF-8, bad JSON),
so that the caller decides whether to stop or to skip and count it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusechat.data.conversations import BadRecord
from fusechat.errors import DataError


def iter_records(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    p = Path(path)
    if p.is_dir():
        yield from _iter_saved_dataset(p, split)
    elif p.is_file():
        first = _first_char(p)
        if p.suffix == ".json" and first == "[":
            yield from _iter_json_array(p)
        elif p.suffix == ".json" and _is_single_object(p):
            raise DataError(f"{path}: a .json data file must hold a list of conversations (or one per line)")
        else:
            yield from _iter_jsonl(p)
    else:
        yield from _iter_hub_dataset(path, split)


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _is_single_object(path: Path) -> bool:
    """A pretty-printed JSON object (not JSON Lines): its first line alone is not valid JSON."""
    with open(path, "rb") as f:
        first_line = f.readline()
    try:
        json.loads(first_line)
        return False
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord("not_utf8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", where)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecord("malformed_json", f"not valid JSON: {e.msg} (column {e.colno})", where)


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        # One bad byte spoils the whole array: no record can be read on its own.
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); the whole JSON file cannot be read") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno}); the whole file cannot be read") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json data file must hold a list of conversations")
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


def _iter_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a saved Hugging Face dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set data.split")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def _iter_hub_dataset(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        raise DataError(f"{name}: cannot load this dataset from the hub: {e}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", row


def json_object(line: str, what: str = "a JSON object") -> dict:
    """One JSONL line as a dict; ValueError with the reason (column, or the type found) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(record, dict):
        return record
    raise ValueError(f"expected {what}, got {type(record).__name__}")
