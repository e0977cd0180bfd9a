"""Targets trained side by side on a CPU (``train.workers``): each in a process of its own, on one thread.

Models as small as the demo's train no faster on a second thread, so on a CPU machine the
cores are better spent on more targets at once. Each worker is a fresh interpreter
(``spawn``); its output goes to ``targets/.<name>.log``, kept when the target fails and shown
in the error. Only independent targets go side by side: the caller trains the ones that
start from another target (``implicit-dpo`` from ``implicit-sft``) after them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from fusechat.config import RunConfig
from fusechat.errors import FusechatError
from fusechat.progress import console, stage_detail
from fusechat.rundir import RunDir


def parallel_workers(cfg: RunConfig) -> int:
    """How many targets train at once here: ``train.workers`` on a CPU in a single process, else 1."""
    import torch

    if cfg.train.workers < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available():
        return 1
    return cfg.train.workers


def train_side_by_side(cfg: RunConfig, names: list[str], force: bool, train_one: Callable) -> list[Path]:
    """``train_one(cfg, name, force)`` for each name, ``parallel_workers(cfg)`` at a time; the targets' folders in
    ``names`` order."""
    workers = min(parallel_workers(cfg), len(names))
    logs = {name: RunDir(cfg.run_dir).stage("train", f".{name}.log") for name in names}
    console.print(f"train: {len(names)} targets, {workers} at a time, each on one thread (train.workers); "
                  f"their output: {logs[names[0]].parent}/.<target>.log")
    done: dict[str, Path] = {}
    failed = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pool
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = {pool.submit(_train_alone, cfg.model_dump(mode="json", by_alias=True), name, force, train_one,
                               logs[name]): name for name in names}
        for finished in as_completed(running):
            name = running[finished]
            try:
                done[name], seconds = finished.result()
            except Exception as e:  # noqa: BLE001 - reported with the target's log below
                failed.append(f"train {name}: {e} (its output: {logs[name]})")
                continue
            logs[name].unlink(missing_ok=True)
            console.print(f"train {name}: done in {seconds:.0f} s → {done[name]}")
            stage_detail(f"{len(done)}/{len(names)} targets trained")
    if failed:
        raise FusechatError("\n".join(failed))
    return [done[name] for name in names]


def _train_alone(config: dict, name: str, force: bool, train_one: Callable, log: Path) -> tuple[Path, float]:
    """In a worker process: one torch thread, output into the target's log; (its folder, wall time)."""
    import torch

    torch.set_num_threads(1)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w", encoding="utf-8", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        console.file = f
        out = train_one(RunConfig.model_validate(config), name, force)
    return out, time.time() - started
