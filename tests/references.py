"""Plain reference implementations that the package's fast paths are tested (and benchmarked) against.

None of this is fusechat's code path: each is the slow, obvious (or the research code's own)
way to compute what a fusechat function computes fast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fusechat.align.sequence import Groups, dtw_path, path_to_groups
from fusechat.train.loss import IGNORE_INDEX


def dtw_reference(cost: np.ndarray) -> np.ndarray:
    """DTW's accumulated cost by the plain O(n·m) double loop (``align.sequence.dtw_matrix`` vectorises it)."""
    n, m = cost.shape
    inf = float("inf")
    table = [[inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                best = 0
            else:
                best = min(
                    table[i - 1][j - 1] if i and j else inf,
                    table[i - 1][j] if i else inf,
                    table[i][j - 1] if j else inf,
                )
            table[i][j] = int(cost[i][j]) + best
    return np.array(table, dtype=np.int64).reshape(n, m)


def levenshtein_reference(a: str, b: str) -> int:
    """Edit distance in plain Python (``align.sequence.token_distance_matrix`` computes it in bulk)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _one_group(n: int, m: int) -> Groups:
    return np.array([[0, n, 0, m]], dtype=np.int64) if n or m else np.zeros((0, 4), dtype=np.int64)


def align_dtw_reference(pivot_tokens: list[str], source_tokens: list[str]) -> Groups:
    """``align_dtw`` the plain way: Python edit distances and the O(n·m) double loop."""
    if not pivot_tokens or not source_tokens:
        return _one_group(len(pivot_tokens), len(source_tokens))
    cost = np.array([[levenshtein_reference(a, b) for b in source_tokens] for a in pivot_tokens], dtype=np.int64)
    return path_to_groups(dtw_path(dtw_reference(cost)))


def dtw_research(pivot_tokens: list[str], source_tokens: list[str]) -> np.ndarray:
    """The accumulated cost as the FuseChat research code computes it: an (n+1, m+1) float table with an
    infinite border, filled by a Python double loop that calls the C ``editdistance.eval`` for every cell.
    Returns the (n, m) table without the border. Needs ``pip install editdistance`` (the ``bench`` extra)."""
    import editdistance

    n, m = len(pivot_tokens), len(source_tokens)
    table = np.full((n + 1, m + 1), np.inf)
    table[0, 0] = 0.0
    for i, a in enumerate(pivot_tokens):
        for j, b in enumerate(source_tokens):
            table[i + 1, j + 1] = editdistance.eval(a, b) + min(table[i, j + 1], table[i + 1, j], table[i, j])
    return table[1:, 1:]


def align_dtw_research(pivot_tokens: list[str], source_tokens: list[str]) -> Groups:
    """``align_dtw`` computed the research code's way (``dtw_research``), through the same path and groups."""
    if not pivot_tokens or not source_tokens:
        return _one_group(len(pivot_tokens), len(source_tokens))
    return path_to_groups(dtw_path(dtw_research(pivot_tokens, source_tokens)))


def dense_fusion_loss(logits, labels, fused_ids, fused_probs, fusion_mask, lambda_: float) -> torch.Tensor:
    """``train.loss.fusion_loss`` with a dense (B, T, V) target, as the research code builds it."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    if lambda_ == 1.0:
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    dense = torch.zeros_like(logprobs)
    dense.scatter_add_(-1, fused_ids[:, :-1].long(), fused_probs[:, :-1].float())
    per_position = -(dense * logprobs).sum(-1)
    mask = fusion_mask[:, :-1]
    gold_mask = labels[:, 1:] != IGNORE_INDEX
    gold_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp_min(0), reduction="none")
    total = (gold_nll * gold_mask * torch.where(mask, lambda_, 1.0)).sum() + (1 - lambda_) * (per_position * mask).sum()
    return total / (gold_mask | mask).sum().clamp_min(1)
