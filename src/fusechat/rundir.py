"""The run directory: where each stage writes, its manifest, atomic writes, skip-if-complete.

A stage's output folder is complete when its ``manifest.json`` says so and was
produced from the same inputs (its ``fingerprint``). Output is built in a
temporary sibling folder and renamed into place, so a crash never leaves a
half-written folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat import __version__
from fusechat.config import stable_hash
from fusechat.errors import FusechatError
from fusechat.progress import console

STAGES = ("prepare", "represent", "align", "fuse", "sample", "score", "train", "merge", "eval")
# Folder of each stage's output under the run directory.
STAGE_DIRS = {
    "prepare": "prepared",
    "represent": "represent",
    "align": "align",
    "fuse": "fuse",
    "sample": "samples",
    "score": "scores",
    "train": "targets",
    "merge": "merged",
    "eval": "eval",
}
MANIFEST = "manifest.json"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn or foreign file: the stage is redone


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def new_manifest(stage: str, fingerprint: str, **fields: Any) -> dict:
    return {
        "stage": stage,
        "fusechat_version": __version__,
        "fingerprint": fingerprint,
        "complete": False,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }


def is_complete(folder: str | os.PathLike, fingerprint: str, force: bool = False, label: str | None = None) -> bool:
    """True when ``folder`` holds complete output made from the same inputs (said on the console as ``label``).

    Complete output from *other* inputs is an error rather than silently kept or
    silently overwritten: the user either reruns with ``--force`` or picks
    another run directory.
    """
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        return False
    if manifest.get("fingerprint") == fingerprint:
        if not force and label:
            console.print(f"{label}: {folder} is complete, skipping")
        return not force
    if force:
        return False
    raise FusechatError(
        f"{folder} holds complete {manifest.get('stage', 'stage')} output made from other inputs or settings "
        f"(fingerprint {manifest.get('fingerprint')} != {fingerprint}). "
        "Rerun with --force to replace it, or set another run_dir."
    )


inputs_fingerprint = stable_hash  # the stages' name for it


@dataclass
class Building:
    """A stage output being built: write files into ``folder``, add facts to ``manifest``."""

    folder: Path
    manifest: dict


@contextlib.contextmanager
def build_output(final: str | os.PathLike, stage: str, fingerprint: str, started: float | None = None,
                 **fields: Any) -> Iterator[Building]:
    """Build a stage's output folder atomically, with its manifest.

    The block writes into ``building.folder`` (a temporary sibling of ``final``) and may
    add to ``building.manifest``; when it succeeds the manifest gets the wall time since
    ``started`` (default: now) and ``complete: true``, and the folder replaces ``final``.
    """
    started = time.time() if started is None else started
    with atomic_dir(final) as tmp:
        building = Building(tmp, new_manifest(stage, fingerprint, **fields))
        yield building
        building.manifest.setdefault("elapsed_s", round(time.time() - started, 3))
        building.manifest["complete"] = True
        write_manifest(tmp, building.manifest)


def require_complete(folder: str | os.PathLike, what: str, command: str) -> dict:
    """The manifest of ``folder``'s complete output, or an error saying which command makes it."""
    manifest = read_manifest(folder)
    if not manifest or not manifest.get("complete"):
        raise FusechatError(f"{folder} has no complete {what}; run `{command}` first")
    return manifest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of every file's relative name and content under ``path`` (a file hashes as itself)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class RunDir:
    """Paths of one run: ``<run_dir>/<stage>/...``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def stage(self, stage: str, *parts: str) -> Path:
        return self.root.joinpath(STAGE_DIRS[stage], *parts)

    def save_config(self, config_yaml: str) -> None:
        atomic_write_text(self.root / "config.yaml", config_yaml)
