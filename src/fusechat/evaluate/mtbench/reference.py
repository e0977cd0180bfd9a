"""The judge-free score: bits per byte a model spends on the reference answers.

Both turns are scored. For the second turn the conversation holds the first
question, the reference's first answer as the assistant's turn, and the second
question, so every model is scored on the same text whatever it would have
answered itself. Bits are counted as in :func:`fusechat.generation.answer_bits`
(the answer and its end-of-turn token, per UTF-8 byte of the answer), which keeps
models with different tokenizers comparable.
"""

from __future__ import annotations

from collections.abc import Callable

from fusechat.evaluate.items import EvalItem
from fusechat.evaluate.mtbench.data import Benchmark, Question
from fusechat.generation import answer_bits


def reference_items(bench: Benchmark) -> list[tuple[Question, int, EvalItem]]:
    """(question, turn, item) for both turns of every question with a reference answer."""
    out = []
    for q in bench.questions:
        ref = bench.references.get(q.id)
        if ref is None:
            continue
        first = [{"role": "user", "content": q.turns[0]}]
        second = [*first, {"role": "assistant", "content": ref[0]}, {"role": "user", "content": q.turns[1]}]
        out.append((q, 1, EvalItem(f"{q.id}-1", q.category, "distribution", first, ref[0])))
        out.append((q, 2, EvalItem(f"{q.id}-2", q.category, "distribution", second, ref[1])))
    return out


def reference_bits(model, tokenizer, bench: Benchmark, batch_size: int,
                   on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """One record per question and turn: question_id, category, turn, bits, bytes."""
    scored = reference_items(bench)
    if not scored:
        return []
    bits = answer_bits(model, tokenizer, [item for _, _, item in scored], batch_size, on_batch=on_batch)
    return [{"question_id": q.id, "category": q.category, "turn": turn, "bits": b, "bytes": n}
            for (q, turn, _), (b, n) in zip(scored, bits)]
