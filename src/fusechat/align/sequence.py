"""Sequence alignment of two tokenizations of the same text.

An alignment is a list of *groups*: consecutive pivot tokens ``[p0, p1)`` that
cover the same text as consecutive source tokens ``[s0, s1)``. Groups cover both
sequences exactly once, in order; one-to-one, many-to-one, one-to-many and
many-to-many groups all occur.

Two methods:

- ``offsets`` (exact): a group boundary wherever a pivot token and a source token
  start at the same character of the prepared text (token offsets of every model
  are in that one coordinate system).
- ``dtw`` (the paper's): dynamic time warping over the two token-string sequences
  with edit distance as the cost; the optimal path's diagonal steps start groups.
  ``dtw_matrix`` fills the table one anti-diagonal at a time with numpy;
  ``dtw_reference`` is the plain O(n·m) double loop it must agree with.
"""

from __future__ import annotations

import numpy as np

Groups = np.ndarray  # (G, 4) int64 rows: pivot_start, pivot_end, source_start, source_end


def align_offsets(pivot_offsets: np.ndarray, source_offsets: np.ndarray) -> Groups:
    """Groups from character offsets. ``*_offsets``: (T, 2) spans in the same text."""
    p_start = np.maximum.accumulate(np.asarray(pivot_offsets, dtype=np.int64).reshape(-1, 2)[:, 0])
    s_start = np.maximum.accumulate(np.asarray(source_offsets, dtype=np.int64).reshape(-1, 2)[:, 0])
    # Characters where both sequences start a token; 0 always bounds the first group.
    common = np.intersect1d(p_start, s_start, assume_unique=False)
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
    """(n, m) Levenshtein distances between token strings (rapidfuzz, in C++)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if not pivot_tokens or not source_tokens:
        return np.zeros((len(pivot_tokens), len(source_tokens)), dtype=np.int32)
    return cdist(pivot_tokens, source_tokens, scorer=Levenshtein.distance, dtype=np.int32, workers=1)


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost, D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]).

    Cells of one anti-diagonal (i + j = d) depend only on the two diagonals before
    it, so each diagonal is one vectorised step: n + m - 1 numpy steps instead of
    n·m Python ones. With one padding column, the cells of a diagonal are evenly
    strided in the flat arrays, so every step works on slices, never on index arrays.
    """
    n, m = cost.shape
    big = np.iinfo(np.int64).max // 4
    width = m + 1  # (i, j) sits at i * width + j; a diagonal's cells are `width - 1` apart
    c = np.zeros((n, width), dtype=np.int64)
    c[:, :m] = cost
    c = c.ravel()
    D = np.zeros(n * width, dtype=np.int64)
    # Diagonals d-1 and d-2 by row, shifted by one: index 0 is the border row i = -1.
    prev1 = np.full(n + 2, big, dtype=np.int64)
    prev2 = np.full(n + 2, big, dtype=np.int64)
    for d in range(n + m - 1):
        lo, hi = max(0, d - m + 1), min(d, n - 1)
        best = np.minimum(np.minimum(prev2[lo : hi + 1], prev1[lo : hi + 1]), prev1[lo + 1 : hi + 2])
        if d == 0:
            best[0] = 0
        values = c[d + lo * m : d + hi * m + 1 : m] + best
        D[d + lo * m : d + hi * m + 1 : m] = values
        cur = np.full(n + 2, big, dtype=np.int64)
        cur[lo + 1 : hi + 2] = values
        prev2, prev1 = prev1, cur
    return D.reshape(n, width)[:, :m]


def dtw_reference(cost: np.ndarray) -> np.ndarray:
    """The plain O(n·m) double loop, for tests and the benchmark."""
    n, m = cost.shape
    inf = float("inf")
    D = [[inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                best = 0
            else:
                best = min(
                    D[i - 1][j - 1] if i and j else inf,
                    D[i - 1][j] if i else inf,
                    D[i][j - 1] if j else inf,
                )
            D[i][j] = int(cost[i][j]) + best
    return np.array(D, dtype=np.int64).reshape(n, m)


def levenshtein_reference(a: str, b: str) -> int:
    """Plain-Python edit distance, for tests and the benchmark."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def align_dtw_reference(pivot_tokens: list[str], source_tokens: list[str]) -> Groups:
    """``align_dtw`` the plain way: Python edit distances and the O(n·m) double loop."""
    cost = np.array([[levenshtein_reference(a, b) for b in source_tokens] for a in pivot_tokens], dtype=np.int64)
    return path_to_groups(dtw_path(dtw_reference(cost)))


def dtw_path(D: np.ndarray) -> list[tuple[int, int]]:
    """Optimal path from (0, 0) to (n-1, m-1); ties prefer the diagonal, then the pivot step."""
    i, j = D.shape[0] - 1, D.shape[1] - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        moves = []
        if i > 0 and j > 0:
            moves.append((D[i - 1, j - 1], i - 1, j - 1))
        if i > 0:
            moves.append((D[i - 1, j], i - 1, j))
        if j > 0:
            moves.append((D[i, j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda mv: mv[0])  # min keeps the first of equal costs
        path.append((i, j))
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
