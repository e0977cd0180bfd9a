"""A model's answers to both turns of every question, in FastChat's ``model_answer/<model>.jsonl`` format.

One line per question::

    {"question_id": 81, "answer_id": "…", "model_id": "pivot",
     "choices": [{"index": 0, "turns": ["first answer", "second answer"]}], "tstamp": 1718000000.0}

The second turn is asked with the model's own first answer in the
conversation. Questions are answered in batches; each batch's lines are
appended as soon as both turns are done, so an interrupted run keeps every
finished question and a rerun answers only the others.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.jsonl import append_records, read_records, require_fields
from fusechat.evaluate.mtbench.data import (
    FASTCHAT_TEMPERATURE,
    GREEDY_BELOW,
    TURNS,
    Question,
)
from fusechat.generation import ChatEncoder, batches, generate_replies

ANSWER_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")
SAMPLING_SEED = 0


def answer_path(folder: Path, model: str) -> Path:
    return Path(folder) / "model_answer" / f"{model}.jsonl"


def temperature_of(question: Question, mode: str) -> float:
    """0 for greedy decoding; FastChat's temperature of the question's category with ``fastchat``."""
    if mode == "greedy":
        return 0.0
    if mode == "fastchat":
        temperature = FASTCHAT_TEMPERATURE.get(question.category, 0.7)
        return temperature if temperature >= GREEDY_BELOW else 0.0  # FastChat decodes greedily below it
    raise FusechatError(f"eval.mt_bench.temperature must be greedy or fastchat, got {mode!r}")


def read_answers(path: Path) -> dict:
    """Question id -> answer record of an answer file (a missing file has none); the last line of an id wins."""
    answers = {}
    for lineno, record in read_records(path):
        require_fields(record, ANSWER_FIELDS, f"{path}:{lineno}", "an answer")
        turns = answer_turns(record, f"{path}:{lineno}")
        if len(turns) != TURNS:
            raise DataError(f"{path}:{lineno}: field 'choices[0].turns' must hold {TURNS} answers, got {len(turns)}")
        answers[record["question_id"]] = record
    return answers


def answer_turns(record: dict, where: str) -> list[str]:
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise DataError(f"{where}: field 'choices' must be a non-empty list of {{index, turns}} objects")
    turns = choices[0].get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise DataError(f"{where}: field 'choices[0].turns' must be a list of strings")
    return turns


def answer_questions(model, tokenizer, questions: list[Question], path: Path, model_id: str, max_new_tokens: int,
                     batch_size: int, temperature: str = "greedy",
                     on_question: Callable[[Question], None] | None = None) -> dict:
    """Answer every question not yet in ``path``, appending each batch; returns all answers by question id."""
    done = read_answers(path)
    todo = [q for q in questions if q.id not in done]
    if not todo:
        return done
    encoder = ChatEncoder(tokenizer)
    groups: dict[float, list[Question]] = {}
    for q in todo:
        groups.setdefault(temperature_of(q, temperature), []).append(q)
    for temp, group in groups.items():
        lengths = [len(encoder.prompt_ids(_first_turn(q))) for q in group]
        for idx in batches(lengths, batch_size):
            batch = [group[i] for i in idx]
            first = generate_replies(model, tokenizer, encoder, [_first_turn(q) for q in batch], max_new_tokens, temp,
                                     SAMPLING_SEED)
            second = generate_replies(model, tokenizer, encoder, [_second_turn(q, a) for q, a in zip(batch, first)],
                                      max_new_tokens, temp, SAMPLING_SEED)
            records = [answer_record(q, model_id, [a1, a2]) for q, a1, a2 in zip(batch, first, second)]
            append_records(path, records)
            for q, record in zip(batch, records):
                done[q.id] = record
                if on_question:
                    on_question(q)
    return done


def answer_record(question: Question, model_id: str, turns: list[str]) -> dict:
    return {"question_id": question.id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}


def _first_turn(q: Question) -> list[dict]:
    return [{"role": "user", "content": q.turns[0]}]


def _second_turn(q: Question, first_answer: str) -> list[dict]:
    return [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": first_answer},
            {"role": "user", "content": q.turns[1]}]
