"""Pivot next-token distributions derived from a source's by byte prefixes.

Where the pivot's next token does not coincide with a source token, the source
still says which bytes come next. Reading its top-k at the source position that
predicts the source token containing the pivot token's first byte:

- each source token ``s`` (probability ``w``) whose bytes agree with the bytes
  of that source token already emitted before the pivot position contributes
  ``w`` to the pivot token ``p`` that its remaining bytes begin with: the
  *longest* pivot token that is a prefix of them. So ``p`` receives the source's
  mass on source tokens whose bytes begin with ``p``'s bytes, each source token
  counted once (counted for every prefix, the masses would add up to more than 1
  and favour the shortest pieces);
- the source token that the text actually continues with is followed further:
  its mass is split by the source's distribution at the next position, and each
  continuation goes to the longest pivot token that is a prefix of the joined
  bytes, so pivot tokens longer than that source token receive the chained
  probability. This repeats while a longer pivot token is still possible.

Within a group of several pivot pieces this is the conditional given the bytes
already emitted: source tokens that disagree with them are left out, and the
result is renormalised, then cut to the top k.

"Longest" stops at the pivot's pre-tokenizer: a pivot token never runs across the
end of the first piece its pre-tokenizer cuts from the bytes. Byte-level BPE pivots
write a four-space indent as ``"\n   "`` then ``" return"``, though ``"\n    "`` is
in their vocabulary too; crediting the longer token would teach the pivot a
tokenization it never produces (and, in code, to end a function before its body).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class PrefixProjector:
    """Byte-prefix projection for one (pivot, source) pair.

    ``pivot_bytes`` / ``source_bytes``: bytes of each vocabulary id (``vocab.token_texts``);
    ``pivot_special``: pivot ids never chosen by bytes; ``source_special``: source id →
    pivot id for special tokens (they map as a whole, only at a token start);
    ``first_piece``: the byte length of the first piece the pivot's pre-tokenizer cuts
    from some bytes, None while the bytes end inside it (``pivot_first_piece``).
    """

    def __init__(self, pivot_bytes: list[bytes], source_bytes: list[bytes], pivot_special=(),
                 source_special: dict[int, int] | None = None,
                 first_piece: Callable[[bytes], int | None] | None = None):
        skip = set(int(i) for i in pivot_special)
        self.by_bytes: dict[bytes, int] = {}
        for pid, b in enumerate(pivot_bytes):
            if b and pid not in skip and b not in self.by_bytes:
                self.by_bytes[b] = pid
        # Proper prefixes of pivot tokens: a longer pivot token can start with these.
        self.stems: set[bytes] = {b[:n] for b in self.by_bytes for n in range(len(b))}
        self.source_bytes = source_bytes
        self.source_special = dict(source_special or {})
        self.first_piece = first_piece
        self._longest: dict[bytes, int] = {}
        self._piece: dict[bytes, int | None] = {}

    def piece_end(self, x: bytes) -> int | None:
        """Where the pivot's pre-tokenizer ends the first piece of ``x``; None while ``x`` ends inside it."""
        if self.first_piece is None:
            return None
        if x not in self._piece:
            if len(self._piece) >= 1_000_000:
                return self.first_piece(x)
            self._piece[x] = self.first_piece(x)
        return self._piece[x]

    def longest(self, x: bytes) -> int:
        """The longest pivot token that is a prefix of ``x`` within its first pre-tokenized piece (−1: none)."""
        got = self._longest.get(x)
        if got is not None:
            return got
        best = -1
        end = self.piece_end(x)
        for n in range(1, (len(x) if end is None else end) + 1):
            piece = x[:n]
            pid = self.by_bytes.get(piece)
            if pid is not None:
                best = pid
            if piece not in self.stems:
                break
        if len(self._longest) < 1_000_000:
            self._longest[x] = best
        return best

    def position(self, u: int, emitted: bytes, source_ids: np.ndarray, topk_ids: np.ndarray,
                 probs: np.ndarray) -> dict[int, float]:
        """Unnormalised pivot masses where the pivot's next token starts inside (or at) source token ``u``.

        ``emitted``: the bytes of token ``u`` before that point; source position ``u - 1``
        predicts token ``u``. source_ids: (S,); topk_ids, probs: (S, k).
        """
        out: dict[int, float] = {}
        actual = int(source_ids[u])
        for sid, w in zip(topk_ids[u - 1].tolist(), probs[u - 1].tolist()):
            if w <= 0.0:
                continue
            special = self.source_special.get(sid)
            if special is not None:
                if not emitted:
                    out[special] = out.get(special, 0.0) + w
                continue
            sb = self.source_bytes[sid] if sid < len(self.source_bytes) else b""
            if not sb.startswith(emitted):
                continue
            tail = sb[len(emitted):]
            if sid == actual:
                self._follow(tail, w, u + 1, source_ids, topk_ids, probs, out)
            elif tail:
                self._add(tail, w, out)
        return out

    def _add(self, x: bytes, w: float, out: dict[int, float]) -> None:
        pid = self.longest(x)
        if pid >= 0:
            out[pid] = out.get(pid, 0.0) + w

    def _follow(self, prefix: bytes, w: float, v: int, source_ids, topk_ids, probs, out) -> None:
        """Mass ``w`` on the text's own bytes ``prefix``, continued by source token ``v`` onwards."""
        while True:
            if v >= len(source_ids) or prefix not in self.stems or w < 1e-9 or self.piece_end(prefix) is not None:
                self._add(prefix, w, out)
                return
            actual = int(source_ids[v])
            carried = 0.0
            for sid, q in zip(topk_ids[v - 1].tolist(), probs[v - 1].tolist()):
                if q <= 0.0:
                    continue
                if sid == actual:
                    carried += w * q
                elif sid in self.source_special or sid >= len(self.source_bytes):
                    self._add(prefix, w * q, out)  # the pivot token ends where the special token starts
                else:
                    self._add(prefix + self.source_bytes[sid], w * q, out)
            if carried == 0.0 or actual in self.source_special or actual >= len(self.source_bytes):
                if carried:
                    self._add(prefix, carried, out)
                return
            prefix, w, v = prefix + self.source_bytes[actual], carried, v + 1


def pivot_first_piece(tokenizer) -> Callable[[bytes], int | None] | None:
    """``first_piece`` for ``PrefixProjector`` from a fast tokenizer's pre-tokenizer (None without one).

    Bytes that end inside a UTF-8 character are read up to the last whole one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return None

    def first_piece(x: bytes) -> int | None:
        text = x.decode("utf-8", "ignore")
        if not text or text.encode("utf-8") != x[:len(text.encode("utf-8"))]:
            return None
        pieces = pre.pre_tokenize_str(text)
        if len(pieces) < 2 or pieces[0][1][1] <= 0:
            return None
        return len(text[:pieces[0][1][1]].encode("utf-8"))

    return first_piece


def top_k(masses: dict[int, float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k,) ids and probabilities: the k largest masses, renormalised; padded with id 0, probability 0."""
    ids = np.zeros(k, dtype=np.int64)
    probs = np.zeros(k, dtype=np.float32)
    if not masses:
        return ids, probs
    items = sorted(masses.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    total = sum(v for _, v in items)
    if total <= 0:
        return ids, probs
    for j, (pid, v) in enumerate(items):
        ids[j], probs[j] = pid, v / total
    return ids, probs
