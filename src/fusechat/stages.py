"""The pipeline: stages in order, each a module with ``run(cfg, force=..., **options)``."""

from __future__ import annotations

import importlib

from fusechat.config import RunConfig
from fusechat.errors import StageNotAvailable
from fusechat.progress import console
from fusechat.run import STAGES, RunDir

# Stage name -> module that implements it; None where this version has no implementation yet.
IMPLEMENTATIONS: dict[str, str | None] = {
    "prepare": "fusechat.prepare",
    "represent": "fusechat.represent",
    "align": "fusechat.align",
    "fuse": "fusechat.fuse",
    "train": "fusechat.train",
    "merge": "fusechat.merge",
    "eval": "fusechat.evaluate",
}


def stage_outputs(cfg: RunConfig, stage: str) -> list:
    """The folders a stage writes for this run (one per model for per-model stages)."""
    rundir = RunDir(cfg.run_dir)
    if stage == "represent":
        return [rundir.stage(stage, m.name) for m in cfg.models]
    if stage == "train":
        from fusechat.train.stage import targets

        return [rundir.stage(stage, name) for name in targets(cfg)]
    if stage == "fuse" and cfg.fuse.method == "multi":
        return [rundir.stage(stage, "multi")]
    if stage in ("align", "fuse"):
        return [rundir.stage(stage, s.name) for s in cfg.sources]
    if stage == "merge":
        return [rundir.stage(stage, m) for m in dict.fromkeys([cfg.merge.method, *cfg.merge.baselines])]
    return [rundir.stage(stage)]


def available(stage: str) -> bool:
    return IMPLEMENTATIONS.get(stage) is not None


def run_stage(stage: str, cfg: RunConfig, force: bool = False, **options) -> None:
    module = IMPLEMENTATIONS[stage]
    if module is None:
        done = ", ".join(s for s in STAGES if available(s))
        raise StageNotAvailable(f"the {stage} stage is not built yet in this version of fusechat (available: {done})")
    RunDir(cfg.run_dir).save_config(cfg.to_yaml())
    from fusechat.model_sources import ensure_all_converted
    from fusechat.synthetic import ensure_synthetic

    ensure_synthetic(cfg)
    ensure_all_converted(cfg.models)
    options = {k: v for k, v in options.items() if v is not None}
    importlib.import_module(module).run(cfg, force=force, **options)


def run_all(cfg: RunConfig, force: bool = False) -> None:
    """Every stage in order; complete stages skip themselves."""
    for stage in STAGES:
        console.rule(f"[bold]{stage}")
        run_stage(stage, cfg, force=force)
