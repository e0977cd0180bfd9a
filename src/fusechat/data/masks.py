"""Which tokens carry loss: those whose characters overlap an assistant span.

Overlap rather than containment, because tokenizers attach the space before a
word to the word (byte-level ``Ġword``, SentencePiece ``▁word``): the first
assistant token usually starts one character before the content does.
Tokens added by the tokenizer itself (bos) have the empty span ``(0, 0)`` and
never carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
Span = tuple[int, int]


def assistant_token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> np.ndarray:
    """``offsets``: (T, 2) character span of each token; ``spans``: sorted, disjoint assistant spans.

    Returns a (T,) bool array.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return np.zeros(len(offsets), dtype=bool)
    start, end = offsets[:, 0], offsets[:, 1]
    # The first span that ends after the token starts is the only one it can overlap.
    j = np.searchsorted(spans[:, 1], start, side="right")
    inside = j < len(spans)
    span_start = spans[np.minimum(j, len(spans) - 1), 0]
    return inside & (span_start < end) & (end > start)


def labels_from_mask(input_ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    return np.where(np.asarray(mask, dtype=bool), np.asarray(input_ids), IGNORE_INDEX).tolist()
