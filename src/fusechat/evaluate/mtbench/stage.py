"""MT-Bench for the run's models (``<run_dir>/eval/mt_bench/``) or any model folders (``<out>/mt_bench/``).

Per model: its answers (resumed where they stopped) and the bits per byte of the
reference answers; then, with a judge, every answer not yet judged; then the
tables. A model is loaded only when it has something left to do.

``models.json`` records, per row, the model (path and identity) and the
settings its answers were generated with. A row whose weights changed since (a
retrained target) starts over on its own (answers, bits, judgments); answers made
with other settings are not mixed with new ones: the run stops and asks for
``--force``, which starts every row over.
"""

from __future__ import annotations

from pathlib import Path

from fusechat.config import EvalConfig, RunConfig, redacted_url
from fusechat.errors import FusechatError
from fusechat.evaluate.jsonl import read_records
from fusechat.evaluate.mtbench.answers import (
    answer_path,
    answer_questions,
    read_answers,
)
from fusechat.evaluate.mtbench.data import Benchmark, load_benchmark, locate
from fusechat.evaluate.mtbench.judge import (
    judge_name,
    judge_requests,
    judgment_path,
    pending_requests,
    read_judgments,
)
from fusechat.evaluate.mtbench.reference import reference_bits, reference_items
from fusechat.evaluate.mtbench.report import (
    BITS,
    SCORE,
    bits_table,
    format_markdown,
    score_table,
    write_report,
)
from fusechat.evaluate.rows import folder_rows, model_rows, stale_rows
from fusechat.judges.endpoint import EndpointJudge
from fusechat.judges.local import LocalJudge
from fusechat.model_loading import model_path_problem, with_model
from fusechat.progress import console, print_result, progress_bar
from fusechat.rundir import RunDir, atomic_write_json, atomic_write_text, read_cached, sha256_file

FOLDER = "mt_bench"


def run_mt_bench(cfg: RunConfig, force: bool = False) -> Path:
    """MT-Bench for the pivot, sources, targets and merges of a run."""
    out = RunDir(cfg.run_dir).stage("eval", FOLDER)
    if cfg.eval.mt_bench.skip_if_missing:
        try:
            locate(cfg.eval.mt_bench.data_dir)
        except FusechatError as e:
            console.print(f"mt-bench: skipped ({e})")
            return out
    rows = {r.name: (r.path, r.identity) for r in model_rows(cfg)}
    return evaluate(rows, out, cfg.eval, force, f"MT-Bench: {Path(cfg.run_dir).name}")


def mt_bench_folders(paths: list[str], out: str | Path, settings: EvalConfig | None = None,
                     force: bool = False) -> Path:
    """``fusechat eval --benchmark mt-bench --models A B``: rows named after the folders, into ``<out>/mt_bench/``."""
    rows = {r.name: (r.path, r.identity) for r in folder_rows(paths)}
    return evaluate(rows, Path(out) / FOLDER, settings or EvalConfig(), force, "MT-Bench")


def evaluate(rows: dict[str, tuple[str, str]], out: Path, settings: EvalConfig, force: bool, title: str) -> Path:
    """``rows``: name -> (model path, identity). Writes answers, judgments, bits and the report under ``out``."""
    if not rows:
        raise FusechatError("no model to evaluate on MT-Bench")
    mt = settings.mt_bench
    if mt.judge_endpoint and not mt.judge:
        mt = mt.model_copy(update={"judge": "gpt-4"})
    _check_judge(mt)
    bench = load_benchmark(mt.data_dir, mt.reference, judge_prompts=bool(mt.judge))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge = judge_name(mt.judge, mt.judge_endpoint) if mt.judge else None
    # Judgments of answers that are gone would never be redone; without answers, only the bits are kept.
    unanswered = [name for name in rows if mt.answers and not answer_path(out, name).is_file()]
    stale = stale_rows(out, rows, _answer_settings(bench, settings), force, lambda n: answer_path(out, n),
                       "answers", "mt-bench")
    if stale or unanswered:
        _forget(out, list(dict.fromkeys(stale + unanswered)))

    answers, bits = {}, {}
    with progress_bar() as bar:
        for name, (path, identity) in rows.items():
            answers[name], bits[name] = _run_model(name, path, identity, bench, settings, out, bar)
        if judge:
            file = judgment_path(out, judge)
            requests = pending_requests(bench, answers, read_judgments(file))
            if requests:
                _run_judge(mt, settings, judge, requests, file, bar)

    results = _results(bench, rows, answers, bits, out, judge, mt.reference)
    write_report(results, out, title)
    print_result(format_markdown(results))
    console.print(f"mt-bench: {out}")
    return out


# ---------------------------------------------------------------- one model


def _run_model(name: str, path: str, identity: str, bench: Benchmark, settings: EvalConfig, out: Path, bar):
    mt = settings.mt_bench
    file = answer_path(out, name)
    done = read_answers(file)
    todo = sum(q.id not in done for q in bench.questions) if mt.answers else 0
    bits_file = out / "reference_bits" / f"{name}.json"
    bits_key = {"identity": identity, "path": path, "references": _hash(bench.reference_file), "dtype": mt.dtype}
    bits = (read_cached(bits_file, bits_key) or {}).get("records")
    n_reference = len(reference_items(bench))
    if not todo and bits is not None:
        return done, bits

    def work(model, tokenizer):
        answers, scored = done, bits
        if todo:
            task = bar.add_task(f"mt-bench {name}", total=len(bench.questions), completed=len(bench.questions) - todo)
            answers = answer_questions(model, tokenizer, bench.questions, file, name, mt.max_new_tokens,
                                       settings.batch_size, mt.temperature, on_question=lambda q: bar.advance(task))
        if scored is None:
            task = bar.add_task(f"reference bits {name}", total=n_reference)
            scored = reference_bits(model, tokenizer, bench, settings.batch_size,
                                    on_batch=lambda n: bar.advance(task, n))
            atomic_write_json(bits_file, {**bits_key, "records": scored})
        return answers, scored

    return with_model(name, path, work, mt.dtype, settings.device, setting="eval.device")


# ---------------------------------------------------------------- the judge


def _check_judge(mt) -> None:
    """A judge that cannot be reached is reported before any answer is generated."""
    if mt.judge_endpoint:
        if not mt.judge_endpoint.startswith(("http://", "https://")):
            raise FusechatError(f"eval.mt_bench.judge_endpoint must be an http:// or https:// URL, "
                                f"got {redacted_url(mt.judge_endpoint)!r}")
    elif mt.judge:
        problem = model_path_problem(mt.judge)
        if problem:
            raise FusechatError(f"eval.mt_bench.judge: {problem}")


def _run_judge(mt, settings: EvalConfig, name: str, requests, file: Path, bar) -> None:
    task = bar.add_task(f"judge {name}", total=len(requests))
    advance = lambda _: bar.advance(task)
    if mt.judge_endpoint:
        judge = EndpointJudge(mt.judge_endpoint, mt.judge, mt.judge_api_key_env, mt.judge_max_new_tokens,
                              mt.judge_timeout_s, mt.judge_retries, mt.judge_backoff_s)
        judge_requests(judge, requests, file, name, on_request=advance)
        return
    with_model(name, mt.judge, lambda model, tokenizer: judge_requests(
        LocalJudge(model, tokenizer, mt.judge_max_new_tokens, settings.batch_size), requests, file, name,
        on_request=advance), mt.dtype, settings.device, setting="eval.device")


# ---------------------------------------------------------------- which answers belong to which model


def _hash(path: Path) -> str:
    return sha256_file(path)[:16]


def _answer_settings(bench: Benchmark, settings: EvalConfig) -> dict:
    mt = settings.mt_bench
    return {"questions": _hash(bench.question_file), "max_new_tokens": mt.max_new_tokens,
            "temperature": mt.temperature, "dtype": mt.dtype}


def _forget(out: Path, names: list[str]) -> None:
    """Remove the rows' answers, reference bits and judgments."""
    import json

    for name in names:
        answer_path(out, name).unlink(missing_ok=True)
        (out / "reference_bits" / f"{name}.json").unlink(missing_ok=True)
    for file in sorted((out / "model_judgment").glob("*.jsonl")):
        records = [r for _, r in read_records(file)]
        kept = [r for r in records if r.get("model") not in names]
        if len(kept) < len(records):
            atomic_write_text(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


# ---------------------------------------------------------------- results


def _results(bench: Benchmark, rows: dict, answers: dict, bits: dict, out: Path, judge: str | None,
             reference: str) -> dict:
    categories = bench.categories()
    results: dict = {}
    if judge:
        judgments = read_judgments(judgment_path(out, judge))
        category_of = {q.id: q.category for q in bench.questions}
        results["judge"] = judge
        results[SCORE] = score_table(judgments, list(rows), categories, category_of)
    results["reference"] = reference
    results[BITS] = bits_table(bits, categories)
    results["models"] = {name: str(path) for name, (path, _) in rows.items()}
    results["data"] = {"questions": str(bench.question_file), "references": str(bench.reference_file),
                       **({"judge_prompts": str(bench.prompt_file)} if bench.prompt_file else {})}
    results["questions"] = {c: sum(q.category == c for q in bench.questions) for c in categories}
    results["answers"] = {name: len(a) for name, a in answers.items()}
    return results
