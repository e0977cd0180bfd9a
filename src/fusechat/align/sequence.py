"""Sequence alignment of two tokenizations of the same text.

An alignment is a list of *groups*: consecutive pivot tokens ``[p0, p1)`` that
cover the same text as consecutive source tokens ``[s0, s1)``. Groups cover both
sequences exactly once, in order; one-to-one, many-to-one, one-to-many and
many-to-many groups all occur.

Two methods:

- ``offsets`` (exact): a group boundary wherever both sequences have a token
  boundary at the same byte of the prepared text's UTF-8 encoding: a token
  starts there and no token of the same sequence runs across it. ``byte_spans``
  turns each tokenizer's character offsets into byte spans, exact even where a
  byte-level or byte-fallback token ends inside a character.
- ``dtw`` (the paper's): dynamic time warping over the two token-string sequences
  with edit distance as the cost; the optimal path's diagonal steps start groups.
  ``dtw_matrix`` fills the table one row at a time with numpy (a running
  minimum turns the in-row dependency into one vectorised scan). The tests hold it
  against the plain O(n·m) double loop and the research code's own loop
  (``tests/references.py``).
"""

from __future__ import annotations

import numpy as np

Groups = np.ndarray  # (G, 4) int64 rows: pivot_start, pivot_end, source_start, source_end


def char_byte_index(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: the UTF-8 byte offset at which each character starts (and the end)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def partial_tokens(token_bytes: list[bytes]) -> np.ndarray:
    """(V,) bool per vocabulary id: its bytes begin inside a character or end inside one.

    Such tokens (GPT-2's ``Ġæ`` = space + the first byte of 日, byte-fallback pieces)
    share a character with a neighbour, so their character offsets cannot place them.
    """
    out = np.zeros(len(token_bytes), dtype=bool)
    for i, b in enumerate(token_bytes):
        if not b:
            continue
        if b[0] & 0xC0 == 0x80:
            out[i] = True
            continue
        lead = len(b) - 1  # the last byte that is not a continuation byte
        while lead > 0 and b[lead] & 0xC0 == 0x80 and len(b) - lead < 4:
            lead -= 1
        x = b[lead]
        need = 1 if x < 0x80 else 2 if x >> 5 == 0b110 else 3 if x >> 4 == 0b1110 else 4 if x >> 3 == 0b11110 else 1
        out[i] = len(b) - lead < need
    return out


def byte_spans(offsets: np.ndarray, text: str, input_ids=None, token_bytes: list[bytes] | None = None,
               partial: np.ndarray | None = None, text_bytes: bytes | None = None) -> np.ndarray:
    """(T, 2) int64 byte spans in ``text.encode()`` of tokens with (T, 2) character ``offsets``.

    A token that starts or ends inside a character (``partial``, from ``partial_tokens``)
    is placed by its own bytes: it starts where the previous token ended when it begins
    with a continuation byte, and covers ``len(token bytes)`` bytes, provided that those
    are the text's bytes there. Otherwise (the tokenizer normalised the text, NFD → NFC)
    it keeps the span of the characters it touches, which never creates a boundary
    inside them.
    """
    index = char_byte_index(text)
    off = np.clip(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), 0, len(text))
    spans = index[off]
    if token_bytes is None or input_ids is None or len(spans) == 0:
        return spans
    ids = np.asarray(input_ids, dtype=np.int64)
    if partial is None:
        partial = partial_tokens(token_bytes)
    known = ids < len(partial)
    todo = np.flatnonzero(known & partial[np.where(known, ids, 0)])
    if len(todo) == 0:
        return spans
    data = text.encode("utf-8", "surrogatepass") if text_bytes is None else text_bytes
    for t in todo:
        tb = token_bytes[ids[t]]
        lo, hi = spans[t]
        start = spans[t - 1, 1] if tb[0] & 0xC0 == 0x80 and t > 0 else lo
        end = start + len(tb)
        if lo <= start and end <= hi and data[start:end] == tb:
            spans[t] = (start, end)
    return spans


def token_boundaries(spans: np.ndarray) -> np.ndarray:
    """Sorted byte positions where a token of ``spans`` (T, 2) starts and no earlier token runs past it."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return np.zeros(0, dtype=np.int64)
    reach = np.maximum.accumulate(spans[:, 1])
    ok = np.ones(len(spans), dtype=bool)
    ok[1:] = spans[1:, 0] >= reach[:-1]
    return np.unique(spans[ok, 0])


def align_offsets(pivot_spans: np.ndarray, source_spans: np.ndarray) -> Groups:
    """Groups from token spans, (T, 2) each, in one coordinate system: byte spans from
    ``byte_spans`` (exact), or character offsets (exact unless a token ends inside a character).

    A cut is a position that is a token boundary of both sequences; 0 always bounds the first group.
    """
    p_start = np.maximum.accumulate(np.asarray(pivot_spans, dtype=np.int64).reshape(-1, 2)[:, 0])
    s_start = np.maximum.accumulate(np.asarray(source_spans, dtype=np.int64).reshape(-1, 2)[:, 0])
    common = np.intersect1d(token_boundaries(pivot_spans), token_boundaries(source_spans), assume_unique=True)
    common = np.union1d(common, [0])
    p_cut = np.append(np.searchsorted(p_start, common, side="left"), len(p_start))
    s_cut = np.append(np.searchsorted(s_start, common, side="left"), len(s_start))
    return _groups_from_cuts(p_cut, s_cut)


def _groups_from_cuts(p_cut: np.ndarray, s_cut: np.ndarray) -> Groups:
    groups = np.stack([p_cut[:-1], p_cut[1:], s_cut[:-1], s_cut[1:]], axis=1)
    nonempty = (groups[:, 1] > groups[:, 0]) | (groups[:, 3] > groups[:, 2])
    return groups[nonempty]


def group_kinds(groups: Groups) -> dict[str, int]:
    """How many groups are one-to-one, many-to-one, one-to-many, many-to-many or one-sided."""
    n_p = groups[:, 1] - groups[:, 0]
    n_s = groups[:, 3] - groups[:, 2]
    return {
        "one_to_one": int(((n_p == 1) & (n_s == 1)).sum()),
        "many_to_one": int(((n_p > 1) & (n_s == 1)).sum()),
        "one_to_many": int(((n_p == 1) & (n_s > 1)).sum()),
        "many_to_many": int(((n_p > 1) & (n_s > 1)).sum()),
        "one_sided": int(((n_p == 0) | (n_s == 0)).sum()),
    }


# ---------------------------------------------------------------- DTW


def token_distance_matrix(pivot_tokens: list[str], source_tokens: list[str]) -> np.ndarray:
    """(n, m) Levenshtein distances between token strings (rapidfuzz, in C++), each distinct pair computed once."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if not pivot_tokens or not source_tokens:
        return np.zeros((len(pivot_tokens), len(source_tokens)), dtype=np.int32)
    p_unique: dict[str, int] = {}
    p_index = np.array([p_unique.setdefault(t, len(p_unique)) for t in pivot_tokens], dtype=np.intp)
    s_unique: dict[str, int] = {}
    s_index = np.array([s_unique.setdefault(t, len(s_unique)) for t in source_tokens], dtype=np.intp)
    distinct = cdist(list(p_unique), list(s_unique), scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    return np.take(distinct[p_index], s_index, axis=1)  # C-ordered, as dtw_matrix reads rows


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost, D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]).

    One vectorised step per row. With A[j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j])
    and C[j] the running sum of cost[i, :j+1], unrolling the in-row term gives
    D[i, j] = min over l ≤ j of A[l] + C[j] - C[l] = C[j] + cummin(A - C)[j]
    (costs are non-negative integers, so this is exact). When the pivot side is much
    longer, rows run over the source side: D of the transposed cost is the transpose of D.
    """
    n, m = cost.shape
    if n > 2 * m:  # far fewer steps over the other side, worth a transposed copy
        return dtw_matrix(np.ascontiguousarray(cost.T)).T
    cost = np.ascontiguousarray(cost)
    # The narrowest integer type that holds every path sum (below cost.max() * (n + m)): less memory traffic.
    bound = (int(cost.max()) if cost.size else 0) * (n + m)
    dtype = next(t for t in (np.int16, np.int32, np.int64) if bound < np.iinfo(t).max)
    D = np.empty((n, m), dtype=dtype)
    if n == 0 or m == 0:
        return D
    cost = cost.astype(dtype, copy=False)
    running = np.cumsum(cost, axis=1, dtype=dtype)
    before = running - cost  # C[j] - cost[i, j]: the running sum before j, so A - C = min(...) - before
    D[0] = running[0]
    a = np.empty(m, dtype=dtype)
    for i in range(1, n):
        prev = D[i - 1]
        a[0] = prev[0]
        np.minimum(prev[:-1], prev[1:], out=a[1:])
        a -= before[i]
        np.minimum.accumulate(a, out=a)
        np.add(a, running[i], out=D[i])
    return D


def dtw_path(D: np.ndarray) -> list[tuple[int, int]]:
    """Optimal path from (0, 0) to (n-1, m-1); ties prefer the diagonal, then the pivot step."""
    at = D.item  # Python ints: much faster to compare than numpy scalars
    i, j = D.shape[0] - 1, D.shape[1] - 1
    path = [(i, j)]
    while i > 0 and j > 0:
        diag, up, left = at(i - 1, j - 1), at(i - 1, j), at(i, j - 1)
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.extend((r, 0) for r in range(i - 1, -1, -1))
    path.extend((0, c) for c in range(j - 1, -1, -1))
    return path[::-1]


def path_to_groups(path: list[tuple[int, int]]) -> Groups:
    """A diagonal step starts a new group; steps along one sequence extend the current one."""
    if not path:
        return np.zeros((0, 4), dtype=np.int64)
    p_cuts, s_cuts = [0], [0]
    for (pi, pj), (i, j) in zip(path, path[1:]):
        if i > pi and j > pj:
            p_cuts.append(i)
            s_cuts.append(j)
    p_cuts.append(path[-1][0] + 1)
    s_cuts.append(path[-1][1] + 1)
    return _groups_from_cuts(np.array(p_cuts), np.array(s_cuts))


def align_dtw(pivot_tokens: list[str], source_tokens: list[str]) -> Groups:
    """The paper's alignment: DTW over edit distances of the (space-marker-free) token strings."""
    if not pivot_tokens or not source_tokens:
        return _groups_from_cuts(np.array([0, len(pivot_tokens)]), np.array([0, len(source_tokens)]))
    D = dtw_matrix(token_distance_matrix(pivot_tokens, source_tokens))
    return path_to_groups(dtw_path(D))
