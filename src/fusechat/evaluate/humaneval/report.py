"""HumanEval's table: greedy pass@1 of the rows that answered, the canonical solutions' bits per byte of every row."""

from __future__ import annotations

from fusechat.evaluate.humaneval.problems import Problem

PASS = "pass@1"
BITS = "solution_bits_per_byte"


def results_table(problems: list[Problem], verdicts: dict[str, dict[str, dict]], bits: dict[str, list[dict]]) -> dict:
    """pass@1 (passed / problems) per answering row; bits per byte (total bits / total bytes of the solutions that
    fit the model's context) per row."""
    ids = [p.task_id for p in problems]
    passed = {row: sum(bool(v.get(t, {}).get("passed")) for t in ids) for row, v in verdicts.items()}
    per_byte = {}
    for row, records in bits.items():
        scored = [r for r in records if r["bits"] is not None]
        n_bytes = sum(r["bytes"] for r in scored)
        per_byte[row] = round(sum(r["bits"] for r in scored) / n_bytes, 4) if n_bytes else None
    return {PASS: {row: round(n / len(ids), 4) for row, n in passed.items()}, "passed": passed, BITS: per_byte}


def format_markdown(results: dict) -> str:
    n = results.get("problems")
    lines = [f"| model | pass@1 (greedy, {n} problems) | passed | canonical solutions: bits per byte |",
             "|---|---:|---:|---:|"]
    for row, b in results[BITS].items():
        p = results[PASS].get(row)
        lines.append(f"| {row} | {'–' if p is None else f'{p:.3f}'} | {results['passed'].get(row, '–')} | "
                     f"{'–' if b is None else f'{b:.3f}'} |")
    return "\n".join(lines) + "\n"
