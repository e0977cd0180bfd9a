"""The run directory: where each stage writes, its manifest, atomic writes, skip-if-complete.

A stage's output folder is complete when its ``manifest.json`` says so and was
produced from the same inputs (its ``fingerprint``). Output is built in a
temporary sibling folder, flushed to disk and renamed into place, so a crash
never leaves a half-written folder that looks complete. Shards a manifest lists
are checked whole before output counts as complete. One run at a time holds a
run directory (``run_lock``); temporaries of runs that died are removed
(``remove_dead_temporaries``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat import __version__
from fusechat.errors import DiskError, FusechatError, disk_errno
from fusechat.progress import console
from fusechat.shards import shard_problem
from fusechat.stages import STAGES

# Folder of each stage's output under the run directory; the pivot's own answers are prepare's first step.
STAGE_DIRS = {"pivot_answers": "pivot_answers", **{s.name: s.folder for s in STAGES}}
MANIFEST = "manifest.json"
LOCK_FILE = "fusechat.lock"
# What atomic writes leave behind when their process dies: `.NAME.tmp-PID` and `.NAME.old-PID`.
TEMPORARY_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


@contextlib.contextmanager
def writing_in(folder: str | os.PathLike) -> Iterator[None]:
    """A write the disk or file system refuses (permission, read-only, file size, space) becomes a
    ``DiskError`` naming ``folder`` and what to do, instead of a traceback."""
    try:
        yield
    except OSError as e:
        if disk_errno(e) is None:
            raise
        raise DiskError(folder, e) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing_in(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or new entry in ``folder`` survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` to disk (before it is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_cached(path: str | os.PathLike, key: dict) -> dict | None:
    """A JSON cache written with ``atomic_write_json({**key, ...})``: the saved object when every item of ``key``
    matches, else None (missing, torn, foreign, or made for another key: computed again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in key.items()):
        return None
    return saved


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` when the block succeeds; on any failure the
    temporary folder is removed (and a write the disk refuses is a ``DiskError`` naming ``final``)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with writing_in(final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        with writing_in(final):
            yield tmp
            fsync_tree(tmp)  # the rename must not reach the disk before the files do
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        if force:
            return False
        damaged = damaged_shards(folder, manifest)
        if damaged:
            for name, problem in damaged.items():
                console.print(f"{label or folder}: {Path(folder) / name} is damaged ({problem}); redoing it")
            return False
        if label:
            console.print(f"{label}: {folder} is complete, skipping")
        return True
    if force:
        return False
    raise FusechatError(
        f"{folder} holds complete {manifest.get('stage', 'stage')} output made from other inputs or settings "
        f"(fingerprint {manifest.get('fingerprint')} != {fingerprint}). "
        "Rerun with --force to replace it, or set another run_dir."
    )




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
    damaged = damaged_shards(folder, manifest)
    if damaged:
        name, problem = next(iter(damaged.items()))
        raise FusechatError(f"{Path(folder) / name} is damaged ({problem}); rerun `{command}`, which redoes it")
    return manifest


def damaged_shards(folder: str | os.PathLike, manifest: dict) -> dict[str, str]:
    """Shard files the manifest lists (``shards``: file name -> rows) that are missing, torn or of
    another length, with what is wrong with each."""
    out = {}
    for name, rows in (manifest.get("shards") or {}).items():
        problem = shard_problem(Path(folder) / name, rows)
        if problem:
            out[name] = problem
    return out


# ---------------------------------------------------------------- one run per directory, leftovers


_held_locks: dict[Path, list] = {}  # run dir -> [open lock file, depth]: the lock is re-entrant in a process


def _main_rank() -> bool:
    # Under `accelerate launch` / torchrun every process runs the command; the first one holds the lock.
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<run_dir>/fusechat.lock`` for the block: a second run of the same directory stops with an error.

    The lock is a kernel file lock (released when the process ends, however it ends) on a
    file that names its holder's pid and host. A file naming a holder that no longer holds
    the lock is left over from a run that died: it is taken over, with a message.
    """
    root = Path(run_dir).resolve()
    if not _main_rank():
        yield
        return
    if root in _held_locks:
        _held_locks[root][1] += 1
        try:
            yield
        finally:
            _held_locks[root][1] -= 1
        return
    path = root / LOCK_FILE
    with writing_in(root):
        root.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(path)
        f.close()
        who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}" if holder \
            else "another process"
        raise FusechatError(f"{root} is in use by another fusechat run ({who}); wait for it to end, "
                            "or give this run another run_dir") from None
    previous = _lock_holder(path)
    if previous:
        console.print(f"{root}: taking over the lock of pid {previous.get('pid')} on {previous.get('host')} "
                      f"(since {previous.get('started_at')}), which is no longer running")
    try:
        with writing_in(root):
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        f.close()  # the kernel lock goes with it
        raise
    _held_locks[root] = [f, 1]
    try:
        yield
    finally:
        _held_locks[root][1] -= 1
        if _held_locks[root][1] == 0:
            del _held_locks[root]
            # Emptied, not deleted: a waiting process may already have the file open, and deleting it
            # would let a third process lock a new file beside it.
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _lock_holder(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "started_at": "?"}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running here (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_dead_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (``.NAME.tmp-PID``, ``.NAME.old-PID``) that processes which
    are no longer running left under ``root``; returns what was removed."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            m = TEMPORARY_RE.match(name)
            if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            path = Path(folder) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if not TEMPORARY_RE.match(d)]
    if removed:
        console.print(f"removed {len(removed)} temporary file(s) left by stopped runs: "
                      + ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


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
