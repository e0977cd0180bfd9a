"""Projection of a source's top-k distributions onto the pivot's positions and vocabulary.

The distribution at pivot position i predicts pivot token i + 1. It is taken from
the source position whose next token starts the same alignment group as pivot
token i + 1 (with the ``offsets`` method: starts at the same character), its
top-k ids mapped into pivot ids; probabilities of ids that land on the same
pivot token add up, unmapped ids are dropped and the rest renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Status of each pivot position.
ALIGNED = 0  # a source distribution was projected here
ONE_HOT = 1  # no source position qualified (or none of its ids map): one-hot on the gold token
DROPPED = 2  # no source position qualified, and the config drops such positions from the fusion loss
NO_TARGET = 3  # the next token is not an assistant token (or there is none): not part of any loss
STATUS_NAMES = {ALIGNED: "aligned", ONE_HOT: "one_hot", DROPPED: "dropped", NO_TARGET: "no_target"}


@dataclass
class Projected:
    ids: np.ndarray  # (T, k) pivot ids
    probs: np.ndarray  # (T, k) float32, rows sum to 1 where status is ALIGNED or ONE_HOT
    status: np.ndarray  # (T,) int8
    unmapped_positions: int  # aligned positions whose ids all fell outside the pivot vocabulary


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax over the k kept logits of each row (renormalised top-k, as the paper)."""
    x = logits.astype(np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def merge_duplicate_ids(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, add up the probabilities of equal ids; ids < 0 are dropped.

    ids, probs: (M, k). Returns (M, k) rows sorted by probability, padded with id 0
    and probability 0. Rows are *not* renormalised.
    """
    M, k = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    ids_s = np.take_along_axis(ids, order, axis=1)
    p_s = np.take_along_axis(probs, order, axis=1)
    new_run = np.ones_like(ids_s, dtype=bool)
    new_run[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    slot = np.cumsum(new_run, axis=1) - 1 + (np.arange(M) * k)[:, None]
    out_p = np.zeros(M * k, dtype=np.float32)
    np.add.at(out_p, slot.ravel(), p_s.ravel())
    out_id = np.full(M * k, -1, dtype=np.int64)
    out_id[slot[new_run]] = ids_s[new_run]
    out_p[out_id < 0] = 0.0
    out_id[out_id < 0] = 0
    out_p, out_id = out_p.reshape(M, k), out_id.reshape(M, k)
    by_prob = np.argsort(-out_p, axis=1, kind="stable")
    return np.take_along_axis(out_id, by_prob, axis=1), np.take_along_axis(out_p, by_prob, axis=1)


def predicting_positions(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pivot position, source position) pairs: position t - 1 of each predicts token t, a group's first.

    Only groups with tokens on both sides and a token before them on both sides qualify.
    """
    p0, p1, s0, s1 = groups.T
    ok = (p1 > p0) & (s1 > s0) & (p0 >= 1) & (s0 >= 1)
    return p0[ok] - 1, s0[ok] - 1


def project(
    pivot_ids: np.ndarray,
    pivot_target_mask: np.ndarray,
    groups: np.ndarray,
    source_topk_ids: np.ndarray,
    source_topk_logits: np.ndarray,
    vocab_map: np.ndarray,
    unaligned: str = "one_hot",
) -> Projected:
    """One sequence. pivot_ids: (T,); pivot_target_mask: (T,) True where token t is an assistant token;
    groups: (G, 4); source_topk_*: (S, k); vocab_map: (V_source,) pivot id or -1."""
    T = len(pivot_ids)
    k = source_topk_ids.shape[1]
    ids = np.zeros((T, k), dtype=np.int64)
    probs = np.zeros((T, k), dtype=np.float32)
    status = np.full(T, NO_TARGET, dtype=np.int8)
    scored = np.zeros(T, dtype=bool)
    scored[:-1] = pivot_target_mask[1:]  # position i is scored on token i + 1

    p_pos, s_pos = predicting_positions(groups)
    keep = scored[p_pos]
    p_pos, s_pos = p_pos[keep], s_pos[keep]
    mapped = vocab_map[source_topk_ids[s_pos].astype(np.int64)]
    m_ids, m_probs = merge_duplicate_ids(mapped, softmax_rows(source_topk_logits[s_pos]))
    mass = m_probs.sum(axis=1)
    good = mass > 0
    ids[p_pos[good]] = m_ids[good]
    probs[p_pos[good]] = m_probs[good] / mass[good, None]
    status[p_pos[good]] = ALIGNED

    fallback = scored & (status != ALIGNED)
    if unaligned == "one_hot":
        rows = np.flatnonzero(fallback)
        ids[rows, 0] = pivot_ids[rows + 1]
        probs[rows, 0] = 1.0
        status[rows] = ONE_HOT
    else:
        status[fallback] = DROPPED
    return Projected(ids=ids, probs=probs, status=status, unmapped_positions=int((~good).sum()))


def pivot_distribution(topk_ids: np.ndarray, topk_logits: np.ndarray, target_mask: np.ndarray):
    """The pivot's own distributions in the same form: (ids, probs, status)."""
    T = len(topk_ids)
    status = np.full(T, NO_TARGET, dtype=np.int8)
    status[:-1][target_mask[1:]] = ALIGNED
    return topk_ids.astype(np.int64), softmax_rows(topk_logits), status
