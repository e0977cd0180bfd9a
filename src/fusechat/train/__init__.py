"""Stage 5, train: the explicit route's targets (``fusechat.train.targets``), then the implicit route's
(``fusechat.implicit.train``), each trained from the pivot."""

from __future__ import annotations

from pathlib import Path

from fusechat.config import RunConfig
from fusechat.errors import FusechatError
from fusechat.implicit.train import implicit_targets, train_implicit
from fusechat.train.targets import baseline_config, explicit_targets, train_target

__all__ = ["run", "targets"]


def targets(cfg: RunConfig) -> list[str]:
    """Names of the targets this config trains, in order: the explicit route's, then the implicit route's."""
    return list(dict.fromkeys(explicit_targets(cfg) + implicit_targets(cfg)))


def run(cfg: RunConfig, force: bool = False, source: str | None = None) -> list[Path]:
    """Train every target of the run (or the one named ``source``), in order: implicit-dpo after implicit-sft."""
    names = targets(cfg)
    if source is not None:
        if source not in names:
            raise FusechatError(f"no target {source!r} in this run (targets: {', '.join(names)})")
        names = [source]
    implicit = set(implicit_targets(cfg))
    out = []
    for name in names:
        if name in implicit:
            out.append(train_implicit(cfg, name, force))
        else:
            out.append(train_target(baseline_config(cfg, name) if name in cfg.train.baselines else cfg, name, force))
    return out
