"""Stage 7, eval: every model of a run on held-out items, into ``<run_dir>/eval/``.

Rows: ``pivot``, each source by name, each complete target (``target-<source>``,
``sft``, ``multi``) and each complete merge (by method). Models are loaded one
at a time, so memory holds one model. ``results.json``, ``results.md`` and
``results.png`` come from :mod:`fusechat.evaluate.report`; ``predictions.jsonl``
holds every item's greedy answer and bits, per model.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fusechat.config import EvalConfig, ModelSpec, RunConfig
from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.items import EvalItem, load_items, skills_of
from fusechat.evaluate.metrics import answer_bits, exact_match, generate_answers
from fusechat.evaluate.report import format_markdown, write_report
from fusechat.progress import console, progress_bar
from fusechat.run import RunDir, atomic_dir, atomic_write_text, inputs_fingerprint, is_complete, new_manifest, read_manifest, \
    sha256_file, write_manifest

SKIPPED_MERGE_FOLDERS = ("analysis",)


# ---------------------------------------------------------------- scoring


def evaluate_models(models: dict[str, str], items: list[EvalItem], max_new_tokens: int = 64, batch_size: int = 16,
                    device: str = "cpu") -> dict:
    """``{"exact_match": {row: {skill: x, ..., "average": y}}, "bits_per_byte": {...}}``, rows in ``models`` order.

    ``models`` maps row names to model folders (or hub ids).
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
    import torch

    from fusechat.models import load_causal_lm, load_tokenizer

    spec = ModelSpec(name=_spec_name(name), path=str(path))
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, "fp32", resolve_device(device))
    try:
        model.eval()
        exact = [i for i, it in enumerate(items) if it.kind == "exact"]
        answers = generate_answers(model, tokenizer, [items[i] for i in exact], max_new_tokens, batch_size,
                                   on_batch=on_batch)
        bits = answer_bits(model, tokenizer, items, batch_size, on_batch=on_batch)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    predicted = dict(zip(exact, answers))
    records = []
    for i, (it, (b, n)) in enumerate(zip(items, bits)):
        record = {"model": name, "id": it.id, "skill": it.skill, "kind": it.kind, "bits": b, "bytes": n}
        if i in predicted:
            record.update(prediction=predicted[i], correct=exact_match(predicted[i], it.answer))
        records.append(record)
    return records


def _spec_name(name: str) -> str:
    """A valid ModelSpec name for any row name (it only labels messages)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "model"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FusechatError("eval.device is cuda but no GPU is visible; use cpu or auto")
    return device


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


# ---------------------------------------------------------------- the run's models


@dataclass
class Row:
    name: str
    path: str
    identity: str  # what the model is made from: a stage manifest's fingerprint, or its config's hash
    kind: str  # pivot, source, target or merge


def model_rows(cfg: RunConfig) -> list[Row]:
    """pivot, sources, complete targets, complete merges, in that order."""
    from fusechat.models import config_hash

    rows = [Row("pivot", cfg.pivot.path, config_hash(cfg.pivot), "pivot")]
    rows += [Row(s.name, s.path, config_hash(s), "source") for s in cfg.sources]
    rundir = RunDir(cfg.run_dir)
    sources = [s.name for s in cfg.sources]
    for folder in _complete_folders(rundir.stage("train"), [*sources, "sft", "multi"]):
        label = folder.name if folder.name in ("sft", "multi") else f"target-{folder.name}"
        rows.append(Row(label, str(folder), read_manifest(folder)["fingerprint"], "target"))
    for folder in _complete_folders(rundir.stage("merge"), [cfg.merge.method, *cfg.merge.baselines]):
        if folder.name not in SKIPPED_MERGE_FOLDERS:
            rows.append(Row(folder.name, str(folder), read_manifest(folder)["fingerprint"], "merge"))
    return _unique(rows)


def _complete_folders(parent: Path, preferred: list[str]) -> list[Path]:
    """Folders under ``parent`` whose manifest says complete: ``preferred`` names first, then the rest sorted."""
    if not parent.is_dir():
        return []
    found = {p.name: p for p in parent.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (read_manifest(p) or {}).get("complete")}
    order = [n for n in dict.fromkeys(preferred) if n in found] + sorted(n for n in found if n not in preferred)
    return [found[n] for n in order]


def _unique(rows: list[Row]) -> list[Row]:
    """A later row whose name is taken gets its kind as prefix (a source named ``varm`` and ``merge-varm``)."""
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            row.name = f"{row.kind}-{row.name}"
        seen.add(row.name)
    return rows


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


BENCHMARKS = ("items", "mt-bench")


def run(cfg: RunConfig, force: bool = False, benchmark: str | None = None) -> Path:
    """Evaluate the run's models on ``eval.data`` into ``<run_dir>/eval/`` and on ``eval.benchmarks``.

    ``benchmark`` runs that one only: ``items`` (``eval.data``) or ``mt-bench``
    (into ``<run_dir>/eval/mt_bench/``, see docs/mt-bench.md).
    """
    out = RunDir(cfg.run_dir).stage("eval")
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise FusechatError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    wanted = [benchmark] if benchmark else [*(["items"] if cfg.eval.data else []), *cfg.eval.benchmarks]
    if "items" in wanted or not wanted:
        run_items(cfg, force)
    if "mt-bench" in wanted:
        from fusechat.evaluate.mtbench import run_mt_bench

        run_mt_bench(cfg, force=force)
    return out


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
    from fusechat.evaluate.pipeline import pipeline_summary

    results["pipeline"] = pipeline_summary(cfg)
    with atomic_dir(out) as tmp:
        write_outputs(tmp, results, records, f"fusechat eval: {Path(cfg.run_dir).name}")
        manifest = new_manifest("eval", fingerprint, models=results["models"], data=list(cfg.eval.data),
                                items=len(items), settings=cfg.eval.model_dump(mode="json"),
                                elapsed_s=round(time.time() - started, 3))
        manifest["complete"] = True
        write_manifest(tmp, manifest)
        if (out / "mt_bench").is_dir():  # the benchmark's answers and judgments outlive a redone items eval
            shutil.copytree(out / "mt_bench", tmp / "mt_bench")
    show(results, out)
    return out


def eval_fingerprint(cfg: RunConfig, rows: list[Row]) -> str:
    # The benchmarks' settings are left out: they do not change the items' scores.
    items_settings = cfg.eval.model_dump(mode="json", by_alias=True, exclude={"benchmarks", "mt_bench"})
    payload = {"data": [sha256_file(p) for p in cfg.eval.data],
               "models": [[r.name, r.path, r.identity] for r in rows],
               "eval": inputs_fingerprint({"eval": items_settings})}
    return inputs_fingerprint(payload)


def with_context(results: dict, models: dict[str, str], data: list[str], items: list[EvalItem]) -> dict:
    """The tables plus what they were measured on: model paths, data files, items per skill."""
    counts = {s: sum(it.skill == s for it in items) for s in skills_of(items)}
    return {**results, "models": models, "data": [str(p) for p in data], "items": counts}


def write_outputs(folder: Path, results: dict, records: dict[str, list[dict]], title: str) -> None:
    write_report(results, folder, title)
    lines = [json.dumps(r, ensure_ascii=False) for recs in records.values() for r in recs]
    atomic_write_text(folder / "predictions.jsonl", "\n".join(lines) + "\n")


def show(results: dict, out: Path) -> None:
    from rich.markdown import Markdown

    console.print(Markdown(format_markdown(results)))
    console.print(f"eval: {out}")


# ---------------------------------------------------------------- any models, no run


def evaluate_folders(paths: list[str], data: str | Path, out: str | Path, settings: EvalConfig | None = None) -> Path:
    """``fusechat eval --models A B --data items.jsonl``: rows named after the folders, output in ``out``."""
    settings = settings or EvalConfig()
    models = folder_rows(paths)
    items = load_items(data)
    records = score_models(models, items, settings.max_new_tokens, settings.batch_size, settings.device)
    results = with_context(tables(items, records), models, [str(data)], items)
    out = Path(out)
    write_outputs(out, results, records, "fusechat eval")
    show(results, out)
    return out


def folder_rows(paths: list[str]) -> dict[str, str]:
    """Row name (the folder's name) -> path; two folders with one name are an error."""
    rows: dict[str, str] = {}
    for p in paths:
        name = Path(p.rstrip("/\\")).name or p
        if name in rows:
            raise FusechatError(f"--models: {rows[name]} and {p} are both named {name!r}; rows are named after "
                                "the folders, so give them different names")
        rows[name] = p
    return rows
