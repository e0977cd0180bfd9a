"""Append-only JSONL files that survive a crash: whole records are appended and synced.

A crash can only tear the last line (the records being written). Reading cuts
such a line off the file, so the next append starts on a clean line; every
earlier line is kept byte for byte. A last line that is a whole record but lacks
its newline (a file edited by hand) is kept and given one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusechat.errors import DataError
from fusechat.progress import console


def require_fields(record: dict, fields: tuple[str, ...], where: str, what: str) -> None:
    """A clear error naming the first missing field of ``record`` (``what`` names the kind of record)."""
    missing = [k for k in fields if k not in record]
    if missing:
        raise DataError(f"{where}: field {missing[0]!r} is missing ({what} has {', '.join(fields)})")


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every line; a torn last line is removed from the file, a bad earlier line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, offset = [], 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        last = lineno == len(lines)
        if last and not raw:
            break
        if not last and not raw.strip():
            offset += len(raw) + 1
            continue
        record = _parse(raw)
        if record is not None and last:  # complete, only its newline missing: kept, so that appends start a line
            _end_line(path)
        if record is None:
            if last or all(not rest.strip() for rest in lines[lineno:]):
                _cut(path, offset, lineno)
                break
            raise DataError(f"{path}:{lineno}: not a JSON object; the file is damaged (fix or delete that line)")
        records.append((lineno, record))
        offset += len(raw) + 1
    return records


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _end_line(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def _cut(path: Path, offset: int, lineno: int) -> None:
    console.print(f"[yellow]warning:[/yellow] {path}:{lineno}: an unfinished record (interrupted write) is dropped")
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())


def append_records(path: Path, records: list[dict]) -> None:
    """Append ``records`` as JSON lines in one write, then sync."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
