"""Scorers of implicit fusion: one number per (prompt, answer), higher is better.

- ``CheckerScorer``: a function of the prompt's record and the answer (the
  synthetic skills' checker is ``fusechat.synthetic.skill_checker``, which the
  pipeline passes in: this module knows no skill);
- ``RewardModelScorer``: a sequence classifier with one label, reading the
  conversation through its own chat template;
- ``JudgeScorer``: a chat model (local or behind an OpenAI-compatible endpoint)
  asked for a 1-10 rating; a reply without one leaves the answer unscored (NaN);
- ``ExecutionScorer``: the answer's code run against the prompt's tests in the
  sandbox, only when the user allows running model-written code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fusechat.config import ScoreConfig
from fusechat.errors import DataError, FusechatError
from fusechat.generation import ChatEncoder, pad_batch
from fusechat.implicit.prompts import Prompt
from fusechat.judges.endpoint import EndpointJudge
from fusechat.judges.execution import Limits, code_of, passes_tests, require_allowed
from fusechat.judges.local import LocalJudge
from fusechat.model_loading import (
    TORCH_DTYPES,
    check_weights,
    device_map_for,
    load_causal_lm,
    load_tokenizer,
    reward_model_problem,
    row_spec,
)

Checker = Callable[[Prompt, str], float]  # raises ValueError naming the field it could not use

JUDGE_SYSTEM = ("You are a strict and impartial judge of an AI assistant's answers. Consider correctness first, "
                "then helpfulness and concision.")
JUDGE_PROMPT = ("[Conversation]\n{conversation}\n\n[Answer]\n{answer}\n\nRate the answer to the last user turn on "
                "a scale of 1 to 10. Reply with a one-sentence reason, then the rating in the form: "
                "Rating: [[5]]")
RATING_RE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


class CheckerScorer:
    def __init__(self, checker: Checker):
        self.checker = checker

    def score(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        out = []
        for p, a in zip(prompts, answers):
            try:
                out.append(float(self.checker(p, a)))
            except ValueError as e:
                raise DataError(f"{p.where()}: {e}") from None
        return out

    def close(self) -> None:
        pass


class RewardModelScorer:
    def __init__(self, folder: str, s: ScoreConfig):
        import torch
        from transformers import AutoModelForSequenceClassification

        problem = reward_model_problem(folder)
        if problem:
            raise FusechatError(f"implicit.score.reward_model: {problem}")
        spec = row_spec("reward-model", folder)
        check_weights(spec)
        self.tokenizer = load_tokenizer(spec)
        self.encoder = ChatEncoder(self.tokenizer)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=getattr(torch, TORCH_DTYPES[s.dtype]), use_safetensors=True,
            device_map=device_map_for(s.device, "implicit.score.device"))
        self.model.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad  # the classifier reads the last token before the padding
        self.pad = pad if pad is not None else 0
        self.batch_size = s.batch_size

    def score(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        import torch

        seqs = [self.encoder.encode(self.encoder.render([*p.messages, {"role": "assistant", "content": a}],
                                                        add_generation_prompt=False))
                for p, a in zip(prompts, answers)]
        out = []
        for at in range(0, len(seqs), self.batch_size):
            ids, mask = pad_batch(seqs[at:at + self.batch_size], self.pad, "right")
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.model.device),
                                    attention_mask=mask.to(self.model.device)).logits
            out += logits[:, 0].float().cpu().tolist()
        return out

    def close(self) -> None:
        del self.model


class JudgeScorer:
    def __init__(self, s: ScoreConfig):
        self.model = None
        if s.judge_endpoint:
            self.judge = EndpointJudge(s.judge_endpoint, s.judge, s.judge_api_key_env, s.judge_max_new_tokens)
        else:
            spec = row_spec("judge", s.judge)
            self.model = load_causal_lm(spec, s.dtype, device_map_for(s.device, "implicit.score.device"))
            self.judge = LocalJudge(self.model, load_tokenizer(spec), s.judge_max_new_tokens, s.batch_size)
        self.batch_size = s.batch_size

    def score(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        requests = [judge_messages(p, a) for p, a in zip(prompts, answers)]
        out = []
        for at in range(0, len(requests), self.batch_size):
            out += [parse_rating(r) for r in self.judge.complete(requests[at:at + self.batch_size])]
        return out

    def close(self) -> None:
        self.model = None


def judge_messages(prompt: Prompt, answer: str) -> list[dict]:
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(conversation=conversation, answer=answer)}]


def parse_rating(reply) -> float:
    """The last ``[[N]]`` of a judge's reply, or NaN (no rating, or a failed request)."""
    if not isinstance(reply, str):
        return math.nan
    found = RATING_RE.findall(reply)
    return float(found[-1]) if found else math.nan


class ExecutionScorer:
    """1.0 when the code of the answer (its first fenced code block, else all of it) passes the prompt's tests
    (the ``tests`` field of its record: asserts, or any program), else 0.0; each program alone in the sandbox."""

    def __init__(self, s: ScoreConfig):
        require_allowed("implicit.score.scorer execution", s.allow_code_execution)
        self.limits = Limits(cpu_s=int(s.execution_timeout_s) + 1, wall_s=s.execution_timeout_s)

    def score(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        for p in prompts:
            if not isinstance(p.meta.get("tests"), str) or not p.meta["tests"].strip():
                raise DataError(f"{p.where()}: field 'tests' is missing or empty: the execution scorer runs an "
                                "answer's code against its prompt's tests (a string of Python, e.g. asserts)")
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            outcomes = pool.map(lambda pa: passes_tests(code_of(pa[1]), pa[0].meta["tests"], self.limits),
                                zip(prompts, answers))
            return [1.0 if o.passed else 0.0 for o in outcomes]

    def close(self) -> None:
        pass


def make_scorer(s: ScoreConfig, checker: Checker | None):
    if s.scorer == "checker":
        if checker is None:
            raise FusechatError("implicit.score.scorer is checker, but no checker was given: the checker scores "
                                "the synthetic skills (a `synthetic:` run through fusechat's pipeline); use "
                                "reward_model or judge for other data")
        return CheckerScorer(checker)
    if s.scorer == "reward_model":
        return RewardModelScorer(s.reward_model, s)
    if s.scorer == "execution":
        return ExecutionScorer(s)
    return JudgeScorer(s)
