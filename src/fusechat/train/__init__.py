"""Stage 5, train: the explicit route's targets (``fusechat.train.targets``), then the implicit route's
(``fusechat.implicit.train``), each trained from the pivot; on a CPU, ``train.workers`` of them side by side
(``fusechat.train.parallel``)."""

from __future__ import annotations

from pathlib import Path

from fusechat.config import IMPLICIT_DPO, IMPLICIT_SFT, RunConfig
from fusechat.errors import FusechatError
from fusechat.implicit.train import implicit_targets, train_implicit
from fusechat.train.gold import train_gold
from fusechat.train.parallel import parallel_workers, train_side_by_side
from fusechat.train.targets import baseline_config, explicit_targets, train_target

__all__ = ["run", "targets"]


def targets(cfg: RunConfig) -> list[str]:
    """Names of the targets this config trains, in order: the explicit route's, then the implicit route's."""
    return list(dict.fromkeys(explicit_targets(cfg) + implicit_targets(cfg)))


def train_one(cfg: RunConfig, name: str, force: bool = False) -> Path:
    """Train (or skip when complete) the target ``name``."""
    if name in implicit_targets(cfg):
        return train_implicit(cfg, name, force)
    if name in cfg.gold_targets():
        return train_gold(cfg, name, force)
    return train_target(baseline_config(cfg, name) if name in cfg.train.baselines else cfg, name, force)


def run(cfg: RunConfig, force: bool = False, source: str | None = None) -> list[Path]:
    """Train every target of the run (or the one named ``source``), in order: implicit-dpo after implicit-sft."""
    names = targets(cfg)
    if source is not None:
        if source not in names:
            raise FusechatError(f"no target {source!r} in this run (targets: {', '.join(names)})")
        names = [source]
    out: dict[str, Path] = {}
    for group in training_order(cfg, names):
        if parallel_workers(cfg) > 1 and len(group) > 1:
            out.update(zip(group, train_side_by_side(cfg, group, force, train_one)))
        else:
            out.update({name: train_one(cfg, name, force) for name in group})
    return [out[name] for name in names]


def training_order(cfg: RunConfig, names: list[str]) -> list[list[str]]:
    """``names`` in groups, each trained after the one before: implicit-dpo starts from implicit-sft, and with
    `train.start: implicit-sft` so do the fused targets and Multi."""
    if cfg.train.start == IMPLICIT_SFT and IMPLICIT_SFT in names:
        first = [IMPLICIT_SFT]  # alone, on every thread: the rest wait for it
    else:
        first = [n for n in names if n != IMPLICIT_DPO]
    return [group for group in (first, [n for n in names if n not in first]) if group]
