"""Projection of a source's top-k distributions onto the pivot's positions and vocabulary.

The distribution at pivot position i predicts pivot token i + 1.

``project_spans`` (the ``offsets`` method; byte spans of both tokenizations):

- *exact*: a source token covers exactly the bytes of pivot token i + 1. The
  distribution of the source position that predicts it is used, its top-k ids
  mapped into pivot ids; probabilities of ids that land on the same pivot token
  add up, unmapped ids are dropped and the rest renormalised;
- *prefix*: otherwise, the source's distribution is turned into the pivot's by
  byte prefixes (``fusechat.align.prefix``), conditioned on the bytes of the
  source token already emitted when pivot token i + 1 starts inside it;
- *fallback*: neither gives any mass (no source position before, bytes that
  disagree with the text): one-hot on the gold token, or dropped.

``project`` (the ``dtw`` method): the source position whose next token starts the
same alignment group as pivot token i + 1, mapped as in the exact case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusechat.align.prefix import top_k

# Status of each pivot position.
ALIGNED = 0  # a source distribution was projected here
ONE_HOT = 1  # no source position qualified (or none of its ids map): one-hot on the gold token
DROPPED = 2  # no source position qualified, and the config drops such positions from the fusion loss
NO_TARGET = 3  # the next token is not an assistant token (or there is none): not part of any loss
STATUS_NAMES = {ALIGNED: "aligned", ONE_HOT: "one_hot", DROPPED: "dropped", NO_TARGET: "no_target"}

# How an ALIGNED position got its distribution (``Projected.how``); downstream stages read only the status.
HOW_NONE, HOW_EXACT, HOW_PREFIX = 0, 1, 2


@dataclass
class Projected:
    ids: np.ndarray  # (T, k) pivot ids
    probs: np.ndarray  # (T, k) float32, rows sum to 1 where status is ALIGNED or ONE_HOT
    status: np.ndarray  # (T,) int8
    unmapped_positions: int  # exact positions whose ids all fell outside the pivot vocabulary
    how: np.ndarray | None = None  # (T,) int8: HOW_EXACT / HOW_PREFIX where ALIGNED, else HOW_NONE

    def counts(self) -> dict[str, int]:
        """Scored positions by how they got their distribution: exact, prefix, fallback."""
        scored = self.status != NO_TARGET
        how = self.how if self.how is not None else np.where(self.status == ALIGNED, HOW_EXACT, HOW_NONE)
        return {"exact": int((scored & (how == HOW_EXACT)).sum()), "prefix": int((scored & (how == HOW_PREFIX)).sum()),
                "fallback": int((scored & (self.status != ALIGNED)).sum())}


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
    good = _map_rows(p_pos, s_pos, source_topk_ids, source_topk_logits, vocab_map, ids, probs)
    status[p_pos[good]] = ALIGNED
    _fallback(scored, status, ids, probs, pivot_ids, unaligned)
    how = np.where(status == ALIGNED, HOW_EXACT, HOW_NONE).astype(np.int8)
    return Projected(ids=ids, probs=probs, status=status, unmapped_positions=int((~good).sum()), how=how)


def _map_rows(p_pos, s_pos, source_topk_ids, source_topk_logits, vocab_map, ids, probs) -> np.ndarray:
    """Source rows ``s_pos`` mapped through ``vocab_map`` into rows ``p_pos`` of ids/probs; (M,) True where any mass."""
    mapped = vocab_map[source_topk_ids[s_pos].astype(np.int64)]
    m_ids, m_probs = merge_duplicate_ids(mapped, softmax_rows(source_topk_logits[s_pos]))
    mass = m_probs.sum(axis=1)
    good = mass > 0
    ids[p_pos[good]] = m_ids[good]
    probs[p_pos[good]] = m_probs[good] / mass[good, None]
    return good


def _fallback(scored, status, ids, probs, pivot_ids, unaligned: str) -> None:
    fallback = scored & (status != ALIGNED)
    if unaligned == "one_hot":
        rows = np.flatnonzero(fallback)
        ids[rows] = 0
        probs[rows] = 0.0
        ids[rows, 0] = pivot_ids[rows + 1]
        probs[rows, 0] = 1.0
        status[rows] = ONE_HOT
    else:
        status[fallback] = DROPPED


def starts_boundary(spans: np.ndarray) -> np.ndarray:
    """(T,) bool: token t starts at a token boundary (no earlier token runs past its start)."""
    ok = np.ones(len(spans), dtype=bool)
    if len(spans) > 1:
        ok[1:] = spans[1:, 0] >= np.maximum.accumulate(spans[:-1, 1])
    return ok


def project_spans(
    pivot_ids: np.ndarray,
    pivot_target_mask: np.ndarray,
    pivot_spans: np.ndarray,
    source_ids: np.ndarray,
    source_spans: np.ndarray,
    source_topk_ids: np.ndarray,
    source_topk_logits: np.ndarray,
    vocab_map: np.ndarray,
    prefix=None,
    text_bytes: bytes = b"",
    unaligned: str = "one_hot",
) -> Projected:
    """One sequence, from byte spans. pivot_ids: (T,); pivot_target_mask: (T,); pivot_spans: (T, 2);
    source_ids: (S,); source_spans: (S, 2); source_topk_*: (S, k); vocab_map: (V_source,) pivot id or -1;
    prefix: a ``PrefixProjector`` (None: exact positions only); text_bytes: the UTF-8 text the spans index."""
    T = len(pivot_ids)
    k = source_topk_ids.shape[1]
    ids = np.zeros((T, k), dtype=np.int64)
    probs = np.zeros((T, k), dtype=np.float32)
    status = np.full(T, NO_TARGET, dtype=np.int8)
    how = np.zeros(T, dtype=np.int8)
    scored = np.zeros(T, dtype=bool)
    scored[:-1] = pivot_target_mask[1:]
    pivot_spans = np.asarray(pivot_spans, dtype=np.int64).reshape(-1, 2)
    source_spans = np.asarray(source_spans, dtype=np.int64).reshape(-1, 2)
    unmapped = 0

    b, e = pivot_spans[1:, 0], pivot_spans[1:, 1]
    cand = np.flatnonzero(scored[:-1] & (e > b))  # positions whose next pivot token covers some bytes
    real = np.flatnonzero(source_spans[:, 1] > source_spans[:, 0])
    if len(cand) and len(real):
        # Exact: a source token with the same byte span, both starting at a boundary.
        width = int(max(pivot_spans.max(), source_spans.max())) + 1
        s_ok = starts_boundary(source_spans)
        p_ok = starts_boundary(pivot_spans)
        keys = source_spans[real, 0] * width + source_spans[real, 1]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        want = b[cand] * width + e[cand]
        at = np.minimum(np.searchsorted(sorted_keys, want), len(sorted_keys) - 1)
        u = real[order[at]]
        hit = (sorted_keys[at] == want) & (u >= 1) & s_ok[u] & p_ok[cand + 1]
        p_pos, s_pos = cand[hit], u[hit] - 1
        good = _map_rows(p_pos, s_pos, source_topk_ids, source_topk_logits, vocab_map, ids, probs)
        status[p_pos[good]] = ALIGNED
        how[p_pos[good]] = HOW_EXACT
        unmapped = int((~good).sum())

        if prefix is not None:
            rest = cand[status[cand] != ALIGNED]
            starts = source_spans[real, 0]
            at = np.searchsorted(starts, b[rest], side="right") - 1
            inside = at >= 0
            u = np.where(inside, real[np.maximum(at, 0)], -1)
            inside &= (u >= 1) & (source_spans[np.maximum(u, 0), 1] > b[rest])
            if inside.any():
                sprobs = softmax_rows(source_topk_logits)
                sids = source_topk_ids.astype(np.int64)
                source_ids = np.asarray(source_ids, dtype=np.int64)
                for i, ui in zip(rest[inside].tolist(), u[inside].tolist()):
                    emitted = _emitted(prefix.source_bytes, int(source_ids[ui]), text_bytes, int(b[i]),
                                       int(source_spans[ui, 1]))
                    if emitted is None:
                        continue
                    masses = prefix.position(ui, emitted, source_ids, sids, sprobs)
                    if masses:
                        ids[i], probs[i] = top_k(masses, k)
                        if probs[i, 0] > 0:
                            status[i] = ALIGNED
                            how[i] = HOW_PREFIX

    _fallback(scored, status, ids, probs, pivot_ids, unaligned)
    return Projected(ids=ids, probs=probs, status=status, unmapped_positions=unmapped, how=how)


def _emitted(source_bytes: list[bytes], sid: int, text_bytes: bytes, at: int, end: int) -> bytes | None:
    """The bytes of source token ``sid`` before text byte ``at``, the token ending at text byte ``end``.

    Taken from the token's own bytes, which may carry a space marker the text lacks;
    None when the token's bytes do not end with the text's (normalised text).
    """
    tb = source_bytes[sid] if sid < len(source_bytes) else b""
    rest = text_bytes[at:end]
    if len(tb) < len(rest) or not tb.endswith(rest):
        return None
    return tb[: len(tb) - len(rest)]


def pivot_distribution(topk_ids: np.ndarray, topk_logits: np.ndarray, target_mask: np.ndarray):
    """The pivot's own distributions in the same form: (ids, probs, status)."""
    T = len(topk_ids)
    status = np.full(T, NO_TARGET, dtype=np.int8)
    status[:-1][target_mask[1:]] = ALIGNED
    return topk_ids.astype(np.int64), softmax_rows(topk_logits), status
