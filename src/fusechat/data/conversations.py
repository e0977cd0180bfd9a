"""Conversations: parsing ShareGPT and OpenAI-messages records into one validated form.

Every problem is a ``BadRecord`` with a short ``reason`` (for counting when bad
records are skipped) and a message naming the record and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BadRecord(Exception):
    """One input record that cannot be used. ``where`` names file and line or record index."""

    def __init__(self, reason: str, message: str, where: str = ""):
        self.reason = reason
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where: str) -> BadRecord:
        return BadRecord(self.reason, self.message, where)


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass
class Conversation:
    id: str
    origin: str  # file:line or dataset[row], for messages
    messages: list[Message]
    notes: list[str] = field(default_factory=list)  # e.g. "trailing_user_turn" when a last unanswered turn was dropped

    @property
    def system(self) -> list[Message]:
        return [m for m in self.messages if m.role == "system"]

    def exchanges(self) -> list[list[Message]]:
        """The user turn + assistant turn pairs, in order (system messages excluded)."""
        turns = [m for m in self.messages if m.role != "system"]
        return [turns[i : i + 2] for i in range(0, len(turns), 2)]


def detect_format(record: dict) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise BadRecord("unknown_format", f"needs a 'conversations' (ShareGPT) or 'messages' (OpenAI) list; keys: {keys}")


def _read(record: Any, fmt: str, where: str) -> tuple[Conversation, str, int]:
    """(conversation, the format's list key, index shift) of a raw record, before its turn rules are checked."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt in ("auto", "hf") else fmt
    record_format = FORMATS[fmt]
    if record_format.list_key not in record:
        raise BadRecord("unknown_format", f"data.format is {fmt} but the record has no '{record_format.list_key}' list")
    messages, shift = _messages(record, record_format)
    return Conversation(id=_record_id(record, where), origin=where, messages=messages), record_format.list_key, shift


def parse_record(record: Any, fmt: str, where: str, index: int) -> Conversation:
    """Turn one raw record into a validated ``Conversation`` or raise ``BadRecord`` (with ``where`` set)."""
    try:
        conv, list_key, shift = _read(record, fmt, where)
        _check_structure(conv, list_key, shift)
        return conv
    except BadRecord as e:
        raise e.at(where) from None


def parse_prompt(record: Any, fmt: str, where: str, index: int) -> Conversation:
    """A prompt pool's record: a conversation up to a last user turn, with no answer to it; or ``BadRecord``."""
    try:
        conv, list_key, shift = _read(record, fmt, where)
        turns = [m for m in conv.messages if m.role != "system"]
        if not turns or turns[-1].role != "user":
            raise BadRecord("not_a_prompt", f"a prompt ends on a user turn with no answer; its last turn is "
                                            f"{turns[-1].role if turns else 'missing'} (a conversation with its answer "
                                            "belongs in data.paths)")
        conv.messages = [*conv.messages, Message("assistant", "(the answer)")]
        _check_structure(conv, list_key, shift)  # the alternation rules, with a stand-in answer
        conv.messages = conv.messages[:-1]
        return conv
    except BadRecord as e:
        raise e.at(where) from None


def _record_id(record: dict, where: str) -> str:
    rid = record.get("id")
    return str(rid) if isinstance(rid, (str, int)) and str(rid) else where


@dataclass(frozen=True)
class RecordFormat:
    """Where a format keeps its turns, and how it names roles."""

    list_key: str
    role_key: str
    content_key: str
    roles: dict[str, str]
    roles_any_case: bool


FORMATS = {
    "sharegpt": RecordFormat("conversations", "from", "value", SHAREGPT_ROLES, roles_any_case=True),
    "openai": RecordFormat("messages", "role", "content", OPENAI_ROLES, roles_any_case=False),
}


def _messages(record: dict, f: RecordFormat) -> tuple[list[Message], int]:
    """Messages, and how many were added in front of the turn list (a top-level ``system``)."""
    turns = record[f.list_key]
    if not isinstance(turns, list):
        raise BadRecord("bad_field", f"{f.list_key} must be a list, got {type(turns).__name__}")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append(Message("system", system))
    for i, turn in enumerate(turns):
        where = f"{f.list_key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord("bad_field", f"{where} must be an object with '{f.role_key}' and '{f.content_key}'")
        for key in (f.role_key, f.content_key):
            if key not in turn:
                raise BadRecord("bad_field", f"{where} has no '{key}'")
        raw_role = turn[f.role_key]
        key = raw_role.lower() if isinstance(raw_role, str) and f.roles_any_case else raw_role
        role = f.roles.get(key) if isinstance(key, str) else None
        if role is None:
            valid = "|".join(f.roles)
            raise BadRecord("unknown_role", f"{where}.{f.role_key} must be {valid}, got {raw_role!r}")
        messages.append(Message(role, _text(turn[f.content_key], f"{where}.{f.content_key}")))
    return messages, len(messages) - len(turns)


def _text(value: Any, field_name: str) -> str:
    if isinstance(value, list):  # OpenAI content parts: keep the text parts, refuse others
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord("bad_field", f"{field_name}[{j}] is a {kind!r} part; only text parts are supported")
        value = "".join(parts)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadRecord("bad_field", f"{field_name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord("empty_content", f"{field_name} is empty")
    return value


def _check_structure(conv: Conversation, key: str, shift: int = 0) -> None:
    """System messages first, then user/assistant alternating from a user turn.

    A last user turn with no answer is dropped and noted (it carries no
    assistant tokens to learn from); everything else malformed is a BadRecord.
    """
    seen_turn = False
    prev = None
    for i, m in enumerate(conv.messages, start=-shift):
        if m.role == "system":
            if seen_turn:
                raise BadRecord("misplaced_system", f"{key}[{i}] is a system message after the conversation started")
            continue
        if not seen_turn and m.role == "assistant":
            raise BadRecord("starts_with_assistant", f"{key}[{i}] is an assistant turn before any user turn")
        if m.role == prev:
            raise BadRecord(f"consecutive_{m.role}_turns", f"{key}[{i - 1}] and {key}[{i}] are two {m.role} turns in a row")
        seen_turn = True
        prev = m.role
    if not any(m.role == "assistant" for m in conv.messages):
        raise BadRecord("no_assistant_turn", "has no assistant turn")
    if prev == "user":
        conv.messages = conv.messages[:-1]
        conv.notes.append("trailing_user_turn")
