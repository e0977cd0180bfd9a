"""What the judge is asked (FastChat's single-answer grading prompts) and how its rating is read.

Which prompt grades which answer:

=====================  ===========================  ==============================
turn                   writing, roleplay,           math, reasoning, coding
                       extraction, stem, humanities (against the reference answer)
=====================  ===========================  ==============================
first                  ``single-v1``                ``single-math-v1``
second (the whole      ``single-v1-multi-turn``     ``single-math-v1-multi-turn``
conversation shown)
=====================  ===========================  ==============================

The rating is read as FastChat reads it: the first ``[[number]]`` in the
judgment, else the first ``[number]``. When the judgment holds several, the
first one counts. A judgment with neither has no rating (score -1); it is
never guessed from other text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusechat.evaluate.mtbench.data import JUDGE_PROMPTS, NEEDS_REFERENCE, Question

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_SINGLE_BRACKETS = re.compile(r"\[(\d+\.?\d*)\]")
NO_RATING = -1


@dataclass
class JudgeRequest:
    model: str  # the answering model's row name
    question: Question
    turn: int
    prompt_name: str
    system_prompt: str
    user_prompt: str

    @property
    def key(self) -> tuple:
        return (self.question.id, self.model, self.turn)

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": self.user_prompt}]


def prompt_name(question: Question, turn: int) -> str:
    return JUDGE_PROMPTS[(question.category in NEEDS_REFERENCE, turn == 2)]


def judge_request(prompts: dict[str, dict], model: str, question: Question, answers: list[str],
                  reference: list[str] | None, turn: int) -> JudgeRequest:
    """The judge's system prompt and user prompt for one model's answer to one turn."""
    name = prompt_name(question, turn)
    prompt = prompts[name]
    fields = {}
    if question.category in NEEDS_REFERENCE and reference is not None:
        fields["ref_answer_1"] = reference[0]
        if turn == 2:
            fields["ref_answer_2"] = reference[1]
    if turn == 2:
        fields.update(question_1=question.turns[0], question_2=question.turns[1],
                      answer_1=answers[0], answer_2=answers[1])
    else:
        fields.update(question=question.turns[0], answer=answers[0])
    return JudgeRequest(model, question, turn, name, prompt["system_prompt"],
                        prompt["prompt_template"].format(**fields))


def parse_rating(judgment: str) -> int | float:
    """The judge's rating: an int, or a float when written with a decimal point; -1 when there is none."""
    match = RATING.search(judgment) or RATING_SINGLE_BRACKETS.search(judgment)
    if not match:
        return NO_RATING
    text = match.group(1)
    return int(text) if text.isdigit() else float(text)
