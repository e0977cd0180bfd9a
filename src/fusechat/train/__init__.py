"""Training the targets: the sparse fusion loss, data, a Trainer, the implicit route's SFT and DPO, and the stage."""

from __future__ import annotations

from pathlib import Path

from fusechat.config import RunConfig
from fusechat.errors import FusechatError
from fusechat.train.implicit import train_implicit
from fusechat.train.stage import IMPLICIT_TARGETS, baseline_config, targets, train_target

__all__ = ["run"]


def run(cfg: RunConfig, force: bool = False, source: str | None = None) -> list[Path]:
    """Train every target of the run (or the one named ``source``), in order: implicit-dpo after implicit-sft."""
    names = targets(cfg)
    if source is not None:
        if source not in names:
            raise FusechatError(f"no target {source!r} in this run (targets: {', '.join(names)})")
        names = [source]
    out = []
    for name in names:
        if name in IMPLICIT_TARGETS:
            out.append(train_implicit(cfg, name, force))
        else:
            out.append(train_target(baseline_config(cfg, name) if name in cfg.train.baselines else cfg, name, force))
    return out
