"""Which tokens carry loss: those whose characters overlap an assistant span.

Overlap rather than containment, because tokenizers attach the space before a
word to the word (byte-level ``Ġword``, SentencePiece ``▁word``): the first
assistant token usually starts one character before the content does.
Tokens added by the tokenizer itself (bos) have the empty span ``(0, 0)`` and
never carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100
Span = tuple[int, int]


def assistant_token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """``offsets``: (T, 2) character span of each token; ``spans``: sorted, disjoint assistant spans."""
    mask = [False] * len(offsets)
    j = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] < end:
            mask[i] = True
    return mask


def labels_from_mask(input_ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]
