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

With the pivot's tokenizer at hand (``pivot_first_token``), bytes whose first
pre-tokenized piece is complete go to the token the pivot itself writes first for
them, not to the longest prefix: byte-level BPE pivots write a four-space indent as
``"\n   "`` then ``" return"``, though ``"\n    "`` is in their vocabulary too, and
``assistant`` as ``ass`` + ``istant`` though ``assist`` is a token. Crediting the
longest prefix teaches the pivot tokenizations it never produces (in code, at every
indented line). The text's own continuation is followed until its first piece is
complete (at most ``MAX_PIECE_BYTES``); bytes that still end inside it keep the
longest prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_PIECE_BYTES = 64  # the text is followed this far at most for the pivot's first piece; then the longest prefix
CACHE_LIMIT = 1_000_000  # distinct byte strings each cache remembers


class PrefixProjector:
    """Byte-prefix projection for one (pivot, source) pair.

    ``pivot_bytes`` / ``source_bytes``: bytes of each vocabulary id (``vocab.token_texts``);
    ``pivot_special``: pivot ids never chosen by bytes; ``source_special``: source id →
    pivot id for special tokens (they map as a whole, only at a token start);
    ``first_token``: the pivot token the pivot's tokenizer writes first for some bytes,
    None while the bytes end inside their first pre-tokenized piece (``pivot_first_token``).
    """

    def __init__(self, pivot_bytes: list[bytes], source_bytes: list[bytes], pivot_special=(),
                 source_special: dict[int, int] | None = None,
                 first_token: Callable[[bytes], int | None] | None = None):
        skip = set(int(i) for i in pivot_special)
        self.by_bytes: dict[bytes, int] = {}
        for pid, b in enumerate(pivot_bytes):
            if b and pid not in skip and b not in self.by_bytes:
                self.by_bytes[b] = pid
        # Proper prefixes of pivot tokens: a longer pivot token can start with these.
        self.stems: set[bytes] = {b[:n] for b in self.by_bytes for n in range(len(b))}
        self.source_bytes = source_bytes
        self.source_special = dict(source_special or {})
        self.first_token = first_token
        self._longest: dict[bytes, int] = {}
        self._first: dict[bytes, int | None] = {}

    def written(self, x: bytes) -> int | None:
        """The pivot token its tokenizer writes first for ``x``; None while ``x`` ends inside its first piece."""
        if self.first_token is None:
            return None
        if x not in self._first:
            if len(self._first) >= CACHE_LIMIT:
                return self.first_token(x)
            self._first[x] = self.first_token(x)
        return self._first[x]

    def longest(self, x: bytes) -> int:
        """The pivot token ``x`` begins with: the one the pivot writes first, else the longest prefix (−1: none)."""
        got = self._longest.get(x)
        if got is not None:
            return got
        written = self.written(x)
        if written is not None:
            return written
        best = -1
        for n in range(1, len(x) + 1):
            piece = x[:n]
            pid = self.by_bytes.get(piece)
            if pid is not None:
                best = pid
            if piece not in self.stems:
                break
        if len(self._longest) < CACHE_LIMIT:
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
            # With the pivot's tokenizer, the first token of a piece (BPE merges) is known once the piece ends, so
            # the text is followed that far even where no longer pivot token is possible.
            settled = (prefix not in self.stems if self.first_token is None
                       else len(prefix) >= MAX_PIECE_BYTES or self.written(prefix) is not None)
            if v >= len(source_ids) or w < 1e-9 or settled:
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


def pivot_first_token(tokenizer) -> Callable[[bytes], int | None] | None:
    """``first_token`` for ``PrefixProjector`` from a fast tokenizer (None without a pre-tokenizer).

    The bytes are normalised and pre-tokenized as the tokenizer does; once a second piece
    begins, the first is complete and its first token, by the tokenizer's own model (BPE
    merges, not the longest match), is the answer. Bytes that end inside a UTF-8 character
    are read up to the last whole one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return None
    normalizer = backend.normalizer
    # A tokenizer that writes a space marker before the first word (Metaspace's prepend) would read bytes from the
    # middle of a text as its start: only the longest prefix is safe there.
    if [piece for piece, _ in pre.pre_tokenize_str("a")] != ["a"] or (normalizer and normalizer.normalize_str("a") != "a"):
        return None

    def first_token(x: bytes) -> int | None:
        text = x.decode("utf-8", "ignore")
        if not text or not x.startswith(text.encode("utf-8")):
            return None
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        pieces = pre.pre_tokenize_str(text)
        if len(pieces) < 2:
            return None
        tokens = backend.model.tokenize(pieces[0][0])
        return tokens[0].id if tokens else None

    return first_token


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
