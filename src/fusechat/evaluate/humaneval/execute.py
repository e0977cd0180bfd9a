"""Each completion's tests run in the sandbox (``judges/execution.py``), side by side; verdicts kept per row.

A verdict records the hash of the completion it judged, so a completion that changed
is run again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fusechat.evaluate.humaneval.problems import Problem
from fusechat.evaluate.jsonl import append_records, read_records, require_fields
from fusechat.judges.execution import Limits, run_to_end

VERDICT_FIELDS = ("task_id", "completion_sha256", "passed", "status")


def completion_hash(completion: str) -> str:
    return hashlib.sha256(completion.encode("utf-8")).hexdigest()


def read_verdicts(path: Path) -> dict[str, dict]:
    """task_id -> verdict of a verdict file (the last line of a task wins)."""
    verdicts = {}
    for lineno, record in read_records(path):
        require_fields(record, VERDICT_FIELDS, f"{path}:{lineno}", "a verdict")
        verdicts[record["task_id"]] = record
    return verdicts


def judge_completions(problems: list[Problem], completions: dict[str, str], path: Path, timeout_s: float,
                      on_verdict: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """A verdict for every problem's completion, running only those without a verdict on that very completion."""
    verdicts = read_verdicts(path)
    todo = [p for p in problems
            if verdicts.get(p.task_id, {}).get("completion_sha256") != completion_hash(completions[p.task_id])]
    limits = Limits(cpu_s=int(timeout_s) + 1, wall_s=timeout_s)  # the wall clock stops a busy loop first: "timeout"

    def one(problem: Problem) -> dict:
        completion = completions[problem.task_id]
        outcome = run_to_end(problem.program(completion), limits)
        return {"task_id": problem.task_id, "completion_sha256": completion_hash(completion),
                "passed": outcome.passed, "status": outcome.status, "seconds": outcome.seconds}

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for verdict in pool.map(one, todo):
            append_records(path, [verdict])
            verdicts[verdict["task_id"]] = verdict
            if on_verdict:
                on_verdict(verdict)
    return verdicts
