"""Stage 7, eval: every model of a run on held-out items, into ``<run_dir>/eval/``.

Rows: ``pivot``, each source by name, each complete target (``target-<source>``,
``sft``, ``multi``, and on the implicit route ``implicit-sft``, ``implicit-dpo``)
and each complete merge (by method). Models are loaded one
at a time, so memory holds one model. ``results.json``, ``results.md`` and
``results.png`` come from :mod:`fusechat.evaluate.report`; ``predictions.jsonl``
holds every item's greedy answer and bits, per model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from fusechat.config import GOLD, EvalConfig, RunConfig, stable_hash
from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.humaneval import humaneval_folders, run_humaneval
from fusechat.evaluate.items import EvalItem, entropy_floors, exact_match, load_items, skills_of
from fusechat.evaluate.mtbench import mt_bench_folders, run_mt_bench
from fusechat.evaluate.pipeline_report import pipeline_summary
from fusechat.evaluate.report import format_markdown, write_report
from fusechat.evaluate.retention import against, retention
from fusechat.evaluate.rows import Row, folder_rows, model_rows, row_notes
from fusechat.generation import answer_bits, generate_answers
from fusechat.model_loading import with_model
from fusechat.progress import console, print_result, progress_bar
from fusechat.rundir import RunDir, atomic_write_text, build_output, is_complete, sha256_file

# ---------------------------------------------------------------- scoring


def evaluate_models(models: dict[str, str], items: list[EvalItem], max_new_tokens: int = 64, batch_size: int = 16,
                    device: str = "cpu") -> dict:
    """``{"exact_match": {row: {skill: x, ..., "average": y}}, "bits_per_byte": {...}}``, rows in ``models`` order.

    ``models`` maps row names to model folders (or hub:org/name ids).
    """
    return tables(items, score_models(models, items, max_new_tokens, batch_size, device))


def score_models(models: dict[str, str], items: list[EvalItem], max_new_tokens: int, batch_size: int,
                 device: str = "cpu") -> dict[str, list[dict]]:
    """Per row, one record per item: id, skill, kind, bits, bytes (and prediction, correct for exact items)."""
    if not items:
        raise FusechatError("no evaluation items to score")
    if not models:
        raise FusechatError("no model to evaluate")
    records = {}
    steps = len(items) + sum(it.kind == "exact" for it in items)
    with progress_bar() as bar:
        for name, path in models.items():
            task = bar.add_task(f"eval {name}", total=steps)
            records[name] = score_model(name, path, items, max_new_tokens, batch_size, device,
                                        on_batch=lambda n, task=task: bar.advance(task, n))
    return records


def score_model(name: str, path: str, items: list[EvalItem], max_new_tokens: int, batch_size: int,
                device: str = "cpu", on_batch=None) -> list[dict]:
    exact = [i for i, it in enumerate(items) if it.kind == "exact"]

    def work(model, tokenizer):
        answers = generate_answers(model, tokenizer, [items[i].messages for i in exact], max_new_tokens, batch_size,
                                   on_batch=on_batch)
        return answers, answer_bits(model, tokenizer, items, batch_size, on_batch=on_batch)

    answers, bits = with_model(name, path, work, "fp32", device, setting="eval.device")
    predicted = dict(zip(exact, answers))
    records = []
    for i, (it, (b, n)) in enumerate(zip(items, bits)):
        record = {"model": name, "id": it.id, "skill": it.skill, "kind": it.kind, "bits": b, "bytes": n}
        if i in predicted:
            record.update(prediction=predicted[i], correct=exact_match(predicted[i], it.answer))
        records.append(record)
    return records


def tables(items: list[EvalItem], records: dict[str, list[dict]]) -> dict:
    """Exact match per skill with exact items (mean), bits per byte per skill (total bits / total bytes)."""
    skills = skills_of(items)
    exact_skills = [s for s in skills if any(it.skill == s and it.kind == "exact" for it in items)]
    em, bpb = {}, {}
    for name, recs in records.items():
        em[name] = _with_average({s: _mean([r["correct"] for r in recs if r["skill"] == s and "correct" in r])
                                  for s in exact_skills})
        scored = [r for r in recs if r["bits"] is not None]  # items longer than the model's context are not
        bpb[name] = _with_average({s: _ratio(sum(r["bits"] for r in scored if r["skill"] == s),
                                             sum(r["bytes"] for r in scored if r["skill"] == s)) for s in skills})
    return {"exact_match": em, "bits_per_byte": bpb}


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(bits: float, n_bytes: int) -> float | None:
    return bits / n_bytes if n_bytes else None


def _with_average(row: dict[str, float | None]) -> dict[str, float | None]:
    return {**row, "average": _mean([v for v in row.values() if v is not None])}


# ---------------------------------------------------------------- the stage


def load_all_items(paths: list[str]) -> list[EvalItem]:
    """Items of every file, in order; ids must be unique over the files."""
    items, where = [], {}
    for path in paths:
        for it in load_items(path):
            if it.id in where:
                raise DataError(f"{path}: id {it.id!r} is already used in {where[it.id]}")
            where[it.id] = path
            items.append(it)
    return items


BENCHMARKS = ("items", "mt-bench", "humaneval")


def chosen_benchmarks(settings: EvalConfig, benchmark: str | None, has_items: bool) -> list[str]:
    """``benchmark`` alone when given; else the items (when there are any, or nothing else) and eval.benchmarks."""
    if benchmark is not None:
        if benchmark not in BENCHMARKS:
            raise FusechatError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
        return [benchmark]
    return [*(["items"] if has_items or not settings.benchmarks else []), *settings.benchmarks]


def run(cfg: RunConfig, force: bool = False, benchmark: str | None = None) -> Path:
    """Evaluate the run's models on ``eval.data`` into ``<run_dir>/eval/`` and on ``eval.benchmarks``.

    ``benchmark`` runs that one only: ``items`` (``eval.data``), ``mt-bench``
    (into ``<run_dir>/eval/mt_bench/``, see docs/mt-bench.md) or ``humaneval``
    (into ``<run_dir>/eval/humaneval/``, see docs/humaneval.md).
    """
    wanted = chosen_benchmarks(cfg.eval, benchmark, bool(cfg.eval.data))
    if "items" in wanted:
        run_items(cfg, force)
    if "mt-bench" in wanted:
        run_mt_bench(cfg, force=force)
    if "humaneval" in wanted:
        run_humaneval(cfg, force=force)
    return RunDir(cfg.run_dir).stage("eval")


def run_items(cfg: RunConfig, force: bool = False) -> Path:
    """The held-out items of ``eval.data``; skip when complete and unchanged."""
    out = RunDir(cfg.run_dir).stage("eval")
    if not cfg.eval.data:
        raise FusechatError("eval.data is empty: list one or more JSONL files of evaluation items in the config "
                            "(eval.data), or --set eval.data=[items.jsonl]; see docs/eval.md for the format "
                            "(or run a benchmark: eval.benchmarks, --benchmark mt-bench)")
    items = load_all_items(cfg.eval.data)
    rows = model_rows(cfg)
    fingerprint = eval_fingerprint(cfg, rows)
    if is_complete(out, fingerprint, force, label="eval"):
        return out
    started = time.time()
    records = score_models({r.name: r.path for r in rows}, items, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                           cfg.eval.device)
    results = with_context(tables(items, records), {r.name: r.path for r in rows}, cfg.eval.data, items)
    source_skills = {s.name: sorted(s.skills) for s in cfg.sources if s.skills}
    if source_skills:
        results["source_skills"] = source_skills
    merges = [r.name for r in rows if r.kind == "merge" and r.name != GOLD]  # the GOLD merge has no fused targets
    if merges:
        results["merge_method"] = cfg.merge.method
        results["retention"] = retention(results["bits_per_byte"], source_skills, merges)
        results["against_sft"] = against(results["bits_per_byte"], merges)
    results["row_notes"] = row_notes(cfg, list(results["bits_per_byte"]))
    results["pipeline"] = pipeline_summary(cfg)
    with build_output(out, "eval", fingerprint, started, models=results["models"], data=list(cfg.eval.data),
                      items=len(items), settings=cfg.eval.model_dump(mode="json")) as building:
        write_outputs(building.folder, results, records, f"fusechat eval: {Path(cfg.run_dir).name}")
        for kept in ("mt_bench", "humaneval"):  # the benchmarks' answers outlive a redone items eval
            if (out / kept).is_dir():
                shutil.copytree(out / kept, building.folder / kept)
    show(results, out)
    return out


def eval_fingerprint(cfg: RunConfig, rows: list[Row]) -> str:
    # The benchmarks' settings are left out: they do not change the items' scores.
    items_settings = cfg.eval.model_dump(mode="json", by_alias=True, exclude={"benchmarks", "mt_bench", "humaneval"})
    payload = {"data": [sha256_file(p) for p in cfg.eval.data],
               "models": [[r.name, r.path, r.identity] for r in rows],
               "eval": stable_hash({"eval": items_settings})}
    return stable_hash(payload)


def with_context(results: dict, models: dict[str, str], data: list[str], items: list[EvalItem]) -> dict:
    """The tables plus what they were measured on: model paths, data files, items per skill."""
    counts = {s: sum(it.skill == s for it in items) for s in skills_of(items)}
    floors = entropy_floors(items)
    return {**results, **({"entropy_floor": floors} if floors else {}), "models": models,
            "data": [str(p) for p in data], "items": counts}


def write_outputs(folder: Path, results: dict, records: dict[str, list[dict]], title: str) -> None:
    write_report(results, folder, title)
    lines = [json.dumps(r, ensure_ascii=False) for recs in records.values() for r in recs]
    atomic_write_text(folder / "predictions.jsonl", "\n".join(lines) + "\n")


def show(results: dict, out: Path) -> None:
    print_result(format_markdown(results))
    console.print(f"eval: {out}")


# ---------------------------------------------------------------- any models, no run


def evaluate_folders(paths: list[str], out: str | Path, settings: EvalConfig | None = None,
                     data: str | Path | None = None, benchmark: str | None = None, force: bool = False) -> Path:
    """``fusechat eval --models A B [--data items.jsonl] [--benchmark ...]``: rows named after the folders."""
    settings = settings or EvalConfig()
    wanted = chosen_benchmarks(settings, benchmark, data is not None)
    if "items" in wanted and data is None:
        raise FusechatError("--models needs --data FILE: the evaluation items (JSONL, see docs/eval.md)")
    if "items" not in wanted and data is not None:
        raise FusechatError(f"--data goes with the items benchmark, not with --benchmark {benchmark}")
    out = Path(out)
    if "items" in wanted:
        models = {r.name: r.path for r in folder_rows(paths)}
        items = load_items(data)
        records = score_models(models, items, settings.max_new_tokens, settings.batch_size, settings.device)
        results = with_context(tables(items, records), models, [str(data)], items)
        write_outputs(out, results, records, "fusechat eval")
        show(results, out)
    if "mt-bench" in wanted:
        mt_bench_folders(paths, out, settings, force=force)
    if "humaneval" in wanted:
        humaneval_folders(paths, out, settings, force=force)
    return out
