"""Checkpoints and resume of a target's training, shared by every trainer fusechat runs (the fusion
Trainer, TRL's DPO and WRPO trainers).

A target trains under ``<run_dir>/targets/.<name>.work/``. The work folder belongs to one
fingerprint (``settings.json``): a rerun with other inputs or settings starts afresh. A
checkpoint counts once the Trainer has written all of it (``fusechat-checkpoint.json``,
written last); the newest such checkpoint is resumed, newer half-written ones are removed
with a message.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from fusechat.progress import compact_active, console, stage_detail
from fusechat.rundir import atomic_write_json, fsync_tree

WORK_SETTINGS = "settings.json"  # the fingerprint a work folder's checkpoints belong to
CHECKPOINT_SEAL = "fusechat-checkpoint.json"  # written last: the checkpoint is whole


def resume_point(trainer, work: Path, fingerprint: str, name: str, state) -> Path | None:
    """Seal the trainer's checkpoints as they are written; the newest whole one of this fingerprint to resume
    from (newer torn ones are removed, with a message), or None."""
    trainer.add_callback(SealCheckpoints(fingerprint))
    if compact_active():
        show_on_stage_line(trainer, name)
    last, skipped = last_checkpoint(work / "checkpoints", fingerprint)
    state.wait_for_everyone()  # every process has chosen before the main one removes what it skipped
    if state.is_main_process:
        for path, problem in skipped:
            console.print(f"train {name}: skipping {path.name} ({problem}); removing it")
            shutil.rmtree(path, ignore_errors=True)
        if last:
            console.print(f"train {name}: resuming from {last}")
    state.wait_for_everyone()
    return last


def claim_work_folder(work: Path, fingerprint: str, name: str, force: bool) -> None:
    """Tie the work folder to this fingerprint: checkpoints of other inputs or settings are never resumed."""
    if work.exists():
        try:
            owner = json.loads((work / WORK_SETTINGS).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            owner = None
        if force or owner != fingerprint:
            if not force:
                console.print(f"train {name}: the checkpoints in {work} were made with other inputs or settings "
                              f"(fingerprint {owner} != {fingerprint}); starting afresh")
            shutil.rmtree(work)
    atomic_write_json(work / WORK_SETTINGS, {"fingerprint": fingerprint})


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint whole once the Trainer has written it, and logs the loss at every checkpoint
    and at the last step, so that the logged losses cover every step, before and after a resume."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            fsync_tree(folder)
            atomic_write_json(folder / CHECKPOINT_SEAL, {"fingerprint": self.fingerprint, "step": state.global_step})
        return control


class StageLineProgress(TrainerCallback):
    """Training progress as the compact console's stage detail: the target, its step and last loss."""

    def __init__(self, name: str):
        self.name = name
        self.loss = ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            console.print(f"{self.name}: {logs}", markup=False)  # into the compact console's log file
        if logs and "loss" in logs:
            self.loss = f", loss {float(logs['loss']):.3f}"

    def on_step_end(self, args, state, control, **kwargs):
        stage_detail(f"{self.name}: step {state.global_step}/{state.max_steps}{self.loss}")


def show_on_stage_line(trainer, name: str) -> None:
    """Replace the Trainer's progress bar and printed log dictionaries by one compact stage line."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageLineProgress(name))


def mean_logged_loss(history: list[dict]) -> float | None:
    """Mean training loss over every logged step: each logged value weighs the steps since the previous one."""
    total, steps, last = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


def last_checkpoint(folder: Path, fingerprint: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of this fingerprint under ``folder``, and the newer ones passed over
    with why (a kill during a save leaves one half-written)."""
    if not folder.is_dir():
        return None, []
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    skipped = []
    for _, path in found:
        problem = _checkpoint_problem(path, fingerprint)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _checkpoint_problem(path: Path, fingerprint: str) -> str | None:
    try:
        seal = json.loads((path / CHECKPOINT_SEAL).read_text())
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "not completely written"
    if seal.get("fingerprint") != fingerprint:
        return "made with other inputs or settings"
    return None


