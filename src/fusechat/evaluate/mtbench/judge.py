"""Grading the answers with a judge, into FastChat's ``model_judgment/<judge>_single.jsonl``.

One line per model, question and turn::

    {"question_id": 81, "model": "pivot", "judge": ["gpt-4", "single-v1"], "user_prompt": "…",
     "judgment": "… Rating: [[7]]", "score": 7, "turn": 1, "tstamp": 1718000000.0}

``score`` is -1 when the judgment holds no rating; a request that failed
(endpoint judges) also has score -1, an empty judgment and an ``error``.
Lines are appended as judgments come in. A rerun asks only what is missing:
judgments already written are kept, failed requests are asked again (the last
line of a model, question and turn is the one that counts, as in FastChat).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.jsonl import append_records, read_records, require_fields
from fusechat.evaluate.mtbench.answers import answer_turns
from fusechat.evaluate.mtbench.data import TURNS, Benchmark
from fusechat.evaluate.mtbench.prompts import (
    NO_RATING,
    JudgeRequest,
    judge_request,
    parse_rating,
)
from fusechat.judges.endpoint import RequestFailed

JUDGMENT_FIELDS = ("question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp")
MAX_FAILURES_IN_A_ROW = 3


def judge_name(judge: str, endpoint: str | None) -> str:
    """The judge's name in the records: a local folder's name, else the model id as given."""
    if not endpoint and Path(judge).is_dir():
        return Path(judge).resolve().name
    return judge


def judgment_path(folder: Path, name: str) -> Path:
    return Path(folder) / "model_judgment" / f"{name.strip('/').replace('/', '--')}_single.jsonl"


def read_judgments(path: Path) -> dict[tuple, dict]:
    """(question_id, model, turn) -> the last record of that key."""
    out = {}
    for lineno, record in read_records(path):
        require_fields(record, JUDGMENT_FIELDS, f"{path}:{lineno}", "a judgment")
        if record["turn"] not in range(1, TURNS + 1):
            raise DataError(f"{path}:{lineno}: field 'turn' must be 1 or 2, got {record['turn']!r}")
        out[(record["question_id"], record["model"], record["turn"])] = record
    return out


def pending_requests(bench: Benchmark, answers: dict[str, dict], done: dict[tuple, dict]) -> list[JudgeRequest]:
    """Every (model, question, turn) without a judgment, or whose request failed; first turns first."""
    requests = []
    for model, by_question in answers.items():
        for turn in range(1, TURNS + 1):
            for q in bench.questions:
                record = done.get((q.id, model, turn))
                if record is not None and "error" not in record:
                    continue
                answer = by_question.get(q.id)
                if answer is None:
                    continue
                turns = answer_turns(answer, f"the answer of {model} to question {q.id}")
                requests.append(judge_request(bench.prompts, model, q, turns, bench.references.get(q.id), turn))
    return requests


def judgment_record(request: JudgeRequest, name: str, judgment: str | RequestFailed) -> dict:
    record = {"question_id": request.question.id, "model": request.model, "judge": [name, request.prompt_name],
              "user_prompt": request.user_prompt}
    if isinstance(judgment, RequestFailed):
        record.update(judgment="", score=NO_RATING)
    else:
        record.update(judgment=judgment, score=parse_rating(judgment))
    record.update(turn=request.turn, tstamp=time.time())
    if isinstance(judgment, RequestFailed):
        record["error"] = str(judgment)
    return record


def judge_requests(judge, requests: list[JudgeRequest], path: Path, name: str,
                   on_request: Callable[[JudgeRequest], None] | None = None) -> None:
    """Ask ``judge`` (``complete(conversations) -> judgments``) and append each batch of records to ``path``.

    Too many failed requests in a row mean the judge is unreachable: the run
    stops with a message, keeping every record written so far.
    """
    failures = 0
    for at in range(0, len(requests), judge.batch_size):
        batch = requests[at:at + judge.batch_size]
        judgments = judge.complete([r.messages() for r in batch])
        records = [judgment_record(r, name, j) for r, j in zip(batch, judgments)]
        append_records(path, records)
        for request, record in zip(batch, records):
            failures = failures + 1 if "error" in record else 0
            if on_request:
                on_request(request)
        if failures >= MAX_FAILURES_IN_A_ROW:
            where = getattr(judge, "where", "the judge")
            raise FusechatError(f"{where} failed {failures} judgments in a row (last: {records[-1]['error']}); "
                                f"the judgments so far are kept in {path}; rerun to go on")
