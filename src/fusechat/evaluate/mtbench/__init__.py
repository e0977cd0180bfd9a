"""MT-Bench: two-turn answers in FastChat's format, an LLM judge's scores, reference bits per byte (docs/mt-bench.md)."""

from fusechat.evaluate.mtbench.stage import evaluate_folders, run_mt_bench

__all__ = ["evaluate_folders", "run_mt_bench"]
