"""Merging the targets: VaRM, SCE and mergekit's baselines over streamed safetensors."""

from fusechat.merge.stage import run

__all__ = ["run"]
