"""Alignment of each source onto the pivot: sequence alignment, vocabulary mapping, projection."""

from fusechat.align.stage import run

__all__ = ["run"]
