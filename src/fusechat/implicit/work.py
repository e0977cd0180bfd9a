"""Resumable sharded output: shards collect in a work folder, the complete set becomes the stage's output.

A shard file is complete exactly when it exists (``fusechat.shards`` writes then
renames), so a killed run resumes at the first missing shard. The work folder
remembers the fingerprint of its inputs; other inputs start it afresh. A shard holds
its rows and their counts only, so a resumed run's shards are byte for byte those of
an uninterrupted one; the time each took is kept beside it and summed into the manifest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fusechat.errors import FusechatError
from fusechat.rundir import atomic_write_text, build_output
from fusechat.shards import shard_files, shard_meta, shard_name

FINGERPRINT_FILE = "fingerprint"
SECONDS_SUFFIX = ".seconds"  # beside each shard: the wall time it took


def work_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def open_work(work: Path, fingerprint: str, force: bool) -> None:
    """Make ``work`` ready for shards of ``fingerprint`` (main process only)."""
    marker = work / FINGERPRINT_FILE
    old = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if force or (old is not None and old != fingerprint) or (work.exists() and old is None):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint)


def todo_shards(work: Path, num_shards: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """This process's shards not yet written: every ``num_processes``-th from ``process_index``."""
    done = shard_files(work)
    return [i for i in range(num_shards) if i % num_processes == process_index and i not in done]


def record_seconds(work: Path, shard: int, seconds: float) -> None:
    """Keep the wall time of ``shard`` beside it (the manifest's ``elapsed_s`` sums them)."""
    atomic_write_text(work / (shard_name(shard) + SECONDS_SUFFIX), f"{seconds:.3f}\n")


def _seconds(work: Path) -> float:
    total = 0.0
    for path in work.glob("*" + SECONDS_SUFFIX):
        try:
            total += float(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a time is a report, not data: a torn one is left out
    return total


def finish_work(work: Path, out: Path, stage: str, fingerprint: str, num_shards: int, label: str,
                **fields) -> dict:
    """Move every shard of ``work`` into the complete output ``out``; its manifest (with the shards' metadata summed)."""
    files = shard_files(work)
    missing = [i for i in range(num_shards) if i not in files]
    if missing:
        raise FusechatError(f"{label}: shards {missing[:10]} are missing from {work} after the run; rerun to resume")
    metas = [shard_meta(p) for _, p in sorted(files.items())]
    totals: dict = {}
    for meta in metas:
        for key, value in meta.items():
            if key != "shard" and isinstance(value, (int, float)):
                totals[key] = totals.get(key, 0) + value
    elapsed = round(_seconds(work), 3)
    with build_output(out, stage, fingerprint, num_shards=num_shards, elapsed_s=elapsed, **totals,
                      **fields) as building:
        for _, path in sorted(files.items()):
            _link_or_copy(path, building.folder / path.name)
        manifest = building.manifest
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
