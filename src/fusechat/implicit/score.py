"""Implicit fusion, stage score: every sampled answer scored, then the SFT set and the preference pairs.

Scores: ``<run_dir>/scores/shard-*.parquet`` (``seq``, ``id``, ``model``,
``sample``, ``score``; shard i holds the answers of the sample stage's prompt
shard i), resumable per shard like the sample stage. Pairs:
``<run_dir>/pairs/`` with ``sft.jsonl`` (conversations ending in the chosen
answer), ``pairs.jsonl`` (``prompt``, ``chosen``, ``rejected`` in TRL's
conversational preference format, and for WRPO ``target_chosen``),
``report.json`` and ``report.md``; pair rules in ``fusechat.implicit.pairs``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fusechat.config import RunConfig, stable_hash
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.implicit.pairs import Candidate, build_pairs, format_report
from fusechat.implicit.prompts import load_prompts
from fusechat.implicit.sample import read_samples, sample_models
from fusechat.implicit.scorers import Checker, make_scorer
from fusechat.implicit.work import finish_work, open_work, record_seconds, todo_shards, work_folder
from fusechat.model_loading import reward_model_problem
from fusechat.progress import console, progress_bar
from fusechat.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    build_output,
    is_complete,
    require_complete,
    sha256_file,
)
from fusechat.shards import shard_files, shard_name, write_table

PAIRS_DIR = "pairs"


def pairs_folder(cfg: RunConfig) -> Path:
    return RunDir(cfg.run_dir).root / PAIRS_DIR


def pool_answers_file(cfg: RunConfig) -> Path:
    """The SFT set: each prompt's best answer, with the model that wrote it (with a pool, prepare reads it)."""
    return pairs_folder(cfg) / "sft.jsonl"


def _scorer_identity(cfg: RunConfig, checker: Checker | None) -> dict:
    s = cfg.implicit.score
    if s.scorer == "checker":
        return {"checker": getattr(checker, "__qualname__", repr(checker)) if checker else None}
    if s.scorer == "reward_model":
        problem = reward_model_problem(s.reward_model)
        if problem:
            raise FusechatError(f"implicit.score.reward_model: {problem}")
        return {"reward_model": s.reward_model, "config": sha256_file(Path(s.reward_model) / "config.json"),
                "dtype": s.dtype}
    if s.scorer == "execution":
        return {"execution_timeout_s": s.execution_timeout_s}
    return {"judge": s.judge, "endpoint": s.judge_endpoint, "max_new_tokens": s.judge_max_new_tokens}


def run(cfg: RunConfig, force: bool = False, checker: Checker | None = None) -> Path:
    """Score every sampled answer (skipped when complete), then build the pairs; returns the pairs folder."""
    scores = score_answers(cfg, force, checker)
    return write_pairs(cfg, scores, force)


def score_answers(cfg: RunConfig, force: bool = False, checker: Checker | None = None) -> Path:
    s = cfg.implicit.score
    state = process_state(s.device)
    out = RunDir(cfg.run_dir).stage("score")
    work = work_folder(out)
    models = [m.name for m in sample_models(cfg)]
    folders = {m: RunDir(cfg.run_dir).stage("sample", m) for m in models}
    manifests = {m: require_complete(f, f"sampled answers of {m}", "fusechat sample CONFIG")
                 for m, f in folders.items()}
    fingerprint = stable_hash({"samples": {m: manifests[m]["fingerprint"] for m in models},
                                      "scorer": s.scorer, **_scorer_identity(cfg, checker)})
    if is_complete(out, fingerprint, force, label="score"):
        return out
    num_shards = {manifests[m]["num_shards"] for m in models}
    if len(num_shards) != 1:
        raise FusechatError(f"the sample folders of {', '.join(models)} hold different numbers of shards "
                            f"({sorted(num_shards)}); rerun `fusechat sample CONFIG --force`")
    num_shards = num_shards.pop()
    prompts = {p.seq: p for p in load_prompts(cfg)}
    if state.is_main_process:
        open_work(work, fingerprint, force)
    state.wait_for_everyone()
    todo = todo_shards(work, num_shards, state.process_index, state.num_processes)
    if todo:
        scorer = make_scorer(s, checker)
        try:
            with progress_bar() as bar:
                task = bar.add_task("score", total=len(todo))
                for shard in todo:
                    started = time.time()
                    rows = [{**r, "model": m} for m in models for r in read_samples(folders[m], shard)]
                    missing = [r["seq"] for r in rows if r["seq"] not in prompts]
                    if missing:
                        raise FusechatError(f"{folders[rows[0]['model']]}: answers to prompt {missing[0]}, which "
                                            "the data no longer has; rerun `fusechat sample CONFIG --force`")
                    values = score_rows(scorer, [prompts[r["seq"]] for r in rows], [r["response"] for r in rows])
                    write_scores(work / shard_name(shard), rows, values, {
                        "shard": shard, "answers": len(rows), "unscored": sum(math.isnan(v) for v in values),
                        "empty": sum(not r["response"] for r in rows)})
                    record_seconds(work, shard, time.time() - started)
                    bar.advance(task)
        finally:
            scorer.close()
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = finish_work(work, out, "score", fingerprint, num_shards, "score", scorer=s.scorer,
                               models=models)
        console.print(f"score: {manifest['answers']} answers scored by {s.scorer} → {out}")
    state.wait_for_everyone()
    return out


def score_rows(scorer, prompts: list, responses: list[str]) -> list[float]:
    """The scorer's values; an empty answer is not scored (NaN), so it is never chosen nor rejected."""
    kept = [i for i, r in enumerate(responses) if r]
    values = [math.nan] * len(responses)
    if kept:
        for i, v in zip(kept, scorer.score([prompts[i] for i in kept], [responses[i] for i in kept])):
            values[i] = v
    return values


def write_scores(path: Path, rows: list[dict], values: list[float], meta: dict) -> int:
    import pyarrow as pa

    columns = {
        "seq": pa.array([r["seq"] for r in rows], pa.int64()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "model": pa.array([r["model"] for r in rows], pa.string()),
        "sample": pa.array([r["sample"] for r in rows], pa.int32()),
        "score": pa.array(values, pa.float64()),
    }
    return write_table(path, columns, meta)


def read_scores(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for _, path in sorted(shard_files(Path(folder)).items()):
        rows += pq.read_table(path).to_pylist()
    return rows


def write_pairs(cfg: RunConfig, scores: Path, force: bool = False) -> Path:
    out = pairs_folder(cfg)
    score_manifest = require_complete(scores, "scores", "fusechat score CONFIG")
    wrpo = cfg.implicit.dpo.loss == "wrpo"
    fingerprint = stable_hash({"scores": score_manifest["fingerprint"], "wrpo": wrpo,
                                      "pairs": cfg.implicit.pairs.model_dump(mode="json")})
    state = process_state(cfg.implicit.score.device)
    if state.is_main_process and not is_complete(out, fingerprint, force, label="pairs"):
        _build_pairs(cfg, scores, score_manifest, out, fingerprint, wrpo)
    state.wait_for_everyone()
    return out


def _build_pairs(cfg: RunConfig, scores: Path, score_manifest: dict, out: Path, fingerprint: str,
                 wrpo: bool) -> None:
    models = score_manifest["models"]
    if wrpo and cfg.pivot.name not in models:
        raise FusechatError(f"implicit.dpo.loss is wrpo, which needs the pivot's own answers: add "
                            f"{cfg.pivot.name!r} to implicit.sample.models (answering now: {', '.join(models)})")
    prompts = load_prompts(cfg)
    responses = {(m, r["seq"], r["sample"]): r["response"]
                 for m in models for r in read_samples(RunDir(cfg.run_dir).stage("sample", m))}
    answers: dict[int, list[Candidate]] = {}
    for r in read_scores(scores):
        answers.setdefault(r["seq"], []).append(
            Candidate(r["model"], r["sample"], responses[(r["model"], r["seq"], r["sample"])], r["score"]))
    sets = build_pairs(prompts, answers, cfg.implicit.pairs, models, cfg.pivot.name, wrpo)
    with build_output(out, "pairs", fingerprint, report=sets.report) as building:
        _write_jsonl(building.folder / "sft.jsonl", sets.sft)
        _write_jsonl(building.folder / "pairs.jsonl", sets.pairs)
        atomic_write_json(building.folder / "report.json", sets.report)
        atomic_write_text(building.folder / "report.md", format_report(sets.report))
    console.print(format_report(sets.report))
    if not sets.sft:
        console.print("[yellow]warning:[/yellow] the SFT set is empty: no answer passed the pair rules")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
