"""HumanEval: greedy pass@1 with each program run in a sandbox, and the canonical solutions' bits per byte."""

from fusechat.evaluate.humaneval.stage import humaneval_folders, run_humaneval

__all__ = ["humaneval_folders", "run_humaneval"]
