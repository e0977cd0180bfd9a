"""MT-Bench: two-turn answers in FastChat's format, an LLM judge's scores, reference bits per byte (docs/mt-bench.md)."""

from fusechat.evaluate.mtbench.stage import mt_bench_folders, run_mt_bench

__all__ = ["mt_bench_folders", "run_mt_bench"]
