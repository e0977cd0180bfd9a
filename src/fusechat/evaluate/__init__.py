"""Evaluation: greedy exact match and bits per byte of every model of a run, as tables and a chart."""

from fusechat.evaluate.stage import evaluate_models, run

__all__ = ["evaluate_models", "run"]
