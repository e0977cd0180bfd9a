"""Evaluation items: one question (a conversation ending on a user turn) with its reference answer.

A JSONL file holds one item per line::

    {"id": "arith-3", "skill": "arithmetic", "kind": "exact",
     "messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}

``kind`` is ``exact`` (one right answer: judged by exact match of the greedy
answer) or ``distribution`` (many valid answers: judged by the bits per byte the
model spends on the reference answer). A distribution item may also give its
question's true answer distribution's entropy in bits and expected answer length
in bytes (``entropy_bits``, ``expected_bytes``); a skill whose items all give them
gets an entropy floor in the table: the bits per byte of a model that knows the
true distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fusechat.data.readers import json_object
from fusechat.errors import DataError

KINDS = ("exact", "distribution")
ROLES = ("system", "user", "assistant")
FIELDS = ("id", "skill", "kind", "messages", "answer")
FLOOR_FIELDS = ("entropy_bits", "expected_bytes")


def exact_match(prediction: str, answer: str) -> bool:
    """An exact item's verdict: equal once surrounding whitespace is stripped."""
    return prediction.strip() == answer.strip()


@dataclass
class EvalItem:
    id: str
    skill: str
    kind: str  # "exact" or "distribution"
    messages: list[dict] = field(default_factory=list)  # [{"role", "content"}], the last one a user turn
    answer: str = ""
    floor: tuple[float, float] | None = None  # (entropy_bits, expected_bytes) of the true answer distribution


class _Bad(Exception):
    """One problem with one line; turned into a DataError naming file:line."""


def load_items(path: str | Path) -> list[EvalItem]:
    """Every item of a JSONL file, in file order; a bad line is a DataError naming ``file:line`` and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: evaluation file not found")
    items: list[EvalItem] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_item(line)
            except _Bad as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if item.id in first_line:
                raise DataError(f"{path}:{lineno}: id {item.id!r} is already used on line {first_line[item.id]}")
            first_line[item.id] = lineno
            items.append(item)
    if not items:
        raise DataError(f"{path}: no evaluation items (expected one JSON object per line)")
    return items


def parse_item(line: str) -> EvalItem:
    try:
        record = json_object(line, f"a JSON object with {', '.join(FIELDS)}")
    except ValueError as e:
        raise _Bad(str(e)) from None
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise _Bad(f"field {missing[0]!r} is missing (an item needs {', '.join(FIELDS)})")
    item_id = record["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise _Bad(f"field 'id' must be a non-empty string, got {item_id!r}")
    skill = _text(record, "skill")
    if record["kind"] not in KINDS:
        raise _Bad(f"field 'kind' must be one of {', '.join(KINDS)}, got {record['kind']!r}")
    answer = _text(record, "answer")
    return EvalItem(id=str(item_id), skill=skill, kind=record["kind"], messages=_messages(record["messages"]),
                    answer=answer, floor=_floor(record))


def _floor(record: dict) -> tuple[float, float] | None:
    given = [k for k in FLOOR_FIELDS if k in record]
    if not given:
        return None
    if len(given) < len(FLOOR_FIELDS):
        missing = next(k for k in FLOOR_FIELDS if k not in record)
        raise _Bad(f"field {missing!r} is missing: an entropy floor needs both {' and '.join(FLOOR_FIELDS)}")
    for k in FLOOR_FIELDS:
        v = record[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise _Bad(f"field {k!r} must be a number >= 0, got {v!r}")
    return float(record["entropy_bits"]), float(record["expected_bytes"])


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad("field 'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"field 'messages[{i}]' must be an object with role and content")
        if m.get("role") not in ROLES:
            raise _Bad(f"field 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise _Bad(f"field 'messages[{i}].content' must be a string, got {m.get('content')!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise _Bad(f"field 'messages': the last message must be a user turn (the question), "
                   f"got {out[-1]['role']!r}")
    return out


def skills_of(items: list[EvalItem]) -> list[str]:
    """The skills in order of first appearance."""
    return list(dict.fromkeys(it.skill for it in items))


def entropy_floors(items: list[EvalItem]) -> dict[str, float]:
    """Per skill whose items all give their floor: Σ entropy bits / Σ expected bytes."""
    floors = {}
    for skill in skills_of(items):
        of_skill = [it.floor for it in items if it.skill == skill]
        if all(f is not None for f in of_skill):
            n_bytes = sum(b for _, b in of_skill)
            floors[skill] = round(sum(h for h, _ in of_skill) / n_bytes, 4) if n_bytes else 0.0
    return floors
