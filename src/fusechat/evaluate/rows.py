"""Which models a table has: a run's pivot, sources, complete targets and merges, or folders named on the command line;
and which of a benchmark's saved outputs still belong to them (``models.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fusechat.config import GOLD, IMPLICIT_DPO, IMPLICIT_SFT, MULTI, SFT, RunConfig
from fusechat.errors import FusechatError
from fusechat.model_loading import model_hash, row_spec
from fusechat.progress import console
from fusechat.rundir import RunDir, atomic_write_text, read_manifest

SKIPPED_MERGE_FOLDERS = ("analysis",)
LEDGER = "models.json"


@dataclass
class Row:
    name: str
    path: str
    identity: str  # what the model is made from: a stage manifest's fingerprint, or its config's hash
    kind: str  # pivot, source, target, merge or folder


def model_rows(cfg: RunConfig) -> list[Row]:
    """pivot, sources, complete targets (explicit, then implicit-sft, implicit-dpo), complete merges, in that order."""
    rows = [Row("pivot", cfg.pivot.path, model_hash(cfg.pivot), "pivot")]
    rows += [Row(s.name, s.path, model_hash(s), "source") for s in cfg.sources]
    rundir = RunDir(cfg.run_dir)
    sources = [s.name for s in cfg.sources]
    plain = (SFT, MULTI, IMPLICIT_SFT, IMPLICIT_DPO)  # targets that are no source's: rows named as their folders
    for folder in _complete_folders(rundir.stage("train"), [*sources, *plain, *cfg.gold_targets()]):
        label = f"target-{folder.name}" if folder.name in sources else folder.name
        rows.append(Row(label, str(folder), read_manifest(folder)["fingerprint"], "target"))
    merges = [cfg.merge.method, *cfg.merge.baselines, *([GOLD] if len(cfg.gold_targets()) > 1 else [])]
    for folder in _complete_folders(rundir.stage("merge"), merges):
        if folder.name in SKIPPED_MERGE_FOLDERS:
            continue
        manifest = read_manifest(folder)
        changed = retrained_targets(rundir, manifest)
        if changed:
            console.print(f"eval: leaving out {folder}: it was merged from other versions of "
                          f"{', '.join(changed)} (retrained since); `fusechat merge CONFIG --force` remakes it")
            continue
        rows.append(Row(folder.name, str(folder), manifest["fingerprint"], "merge"))
    return _unique(rows)


def row_notes(cfg: RunConfig, names: list[str]) -> dict[str, str]:
    """What each baseline row of a run was trained on: with a prompt pool, the rows a user compares with differ in
    their data (the gold alone, or the gold and the pool's best answers), not only in their method."""
    pool = bool(cfg.pool_paths())
    data = "the gold and the prompt pool's best answers" if pool else "the gold conversations"
    notes = {
        SFT: f"plain fine-tuning of the pivot on the gold conversations{' alone' if pool else ''}",
        MULTI: f"one target fused from every source at once, on {data}",
        IMPLICIT_SFT: (f"plain fine-tuning of the pivot on {data} (sequence-level distillation)" if pool
                       else "plain fine-tuning of the pivot on each prompt's best sampled answer"),
        IMPLICIT_DPO: "implicit-sft, then DPO on pairs of sampled answers",
        **{f"target-{s.name}": f"the pivot fused with {s.name}'s distributions, on {data}" for s in cfg.sources},
        **{g: f"TRL's GOLD: the pivot distilled from {g[len(GOLD) + 1:]} (offline, hybrid ULD loss), on {data}"
           for g in cfg.gold_targets()},
        GOLD: f"the GOLD targets merged with {cfg.merge.method}",
    }
    return {name: notes[name] for name in names if name in notes}


def retrained_targets(rundir: RunDir, merge_manifest: dict) -> list[str]:
    """The targets a merge was made from whose folder now holds another version (or none)."""
    made_from = merge_manifest.get("target_fingerprints") or {}  # absent in merges of older fusechat versions
    return [name for name, fingerprint in made_from.items()
            if (read_manifest(rundir.stage("train", name)) or {}).get("fingerprint") != fingerprint]


def folder_rows(paths: list[str]) -> list[Row]:
    """One row per folder, named after it; two folders with one name are an error."""
    rows: dict[str, Row] = {}
    for p in paths:
        name = Path(p.rstrip("/\\")).name or p
        if name in rows:
            raise FusechatError(f"--models: {rows[name].path} and {p} are both named {name!r}; rows are named "
                                "after the folders, so give them different names")
        rows[name] = Row(name, p, model_hash(row_spec(name, p)), "folder")
    return list(rows.values())


def _complete_folders(parent: Path, preferred: list[str]) -> list[Path]:
    """Folders under ``parent`` whose manifest says complete: ``preferred`` names first, then the rest sorted."""
    if not parent.is_dir():
        return []
    found = {p.name: p for p in parent.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (read_manifest(p) or {}).get("complete")}
    order = [n for n in dict.fromkeys(preferred) if n in found] + sorted(n for n in found if n not in preferred)
    return [found[n] for n in order]


def _unique(rows: list[Row]) -> list[Row]:
    """A later row whose name is taken gets its kind as prefix (a source named ``varm`` and ``merge-varm``)."""
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            row.name = f"{row.kind}-{row.name}"
        seen.add(row.name)
    return rows


def stale_rows(out: Path, rows: dict[str, tuple[str, str]], settings: dict, force: bool,
               output: Callable[[str], Path], what: str, benchmark: str) -> list[str]:
    """Checks ``<out>/models.json`` against ``rows`` (name -> (path, identity)) and records them there. Stops when
    a row's saved ``what`` (the file ``output(name)``) was made with other ``settings``; returns the rows to start
    over: every row with ``force``, else those whose weights changed since (a retrained target, another seed)."""
    ledger_file = Path(out) / LEDGER
    try:
        ledger = json.loads(ledger_file.read_text(encoding="utf-8")) if ledger_file.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        ledger = {}
    stale = []
    for name, (path, identity) in rows.items():
        old, saved = ledger.get(name), output(name).is_file()
        if saved and not force and old is not None and old.get("settings") != settings:
            raise FusechatError(f"{output(name)} holds {what} made with other settings ({', '.join(settings)}); "
                                "rerun with --force to answer again, or use another output folder")
        if force or (old is not None and old.get("identity") != identity):
            if saved and not force:
                console.print(f"{benchmark}: {name}'s weights changed since its {what}; answering again")
            stale.append(name)
        ledger[name] = {"path": str(path), "identity": identity, "settings": settings}
    atomic_write_text(ledger_file, json.dumps(ledger, indent=2) + "\n")
    return stale
