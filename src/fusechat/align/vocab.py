"""Vocabulary mapping source → pivot.

Each token is first turned into the bytes of text it stands for, whatever the
tokenizer's way of writing it (byte-level ``Ġ``/``Ċ`` and the rest of the GPT-2
byte alphabet, SentencePiece ``▁``, ``<0xNN>`` byte-fallback pieces, WordPiece
``##``). Then, in order:

1. ``special``: bos, eos, unk and pad map to the pivot's token of the same role;
   other special tokens by identical text;
2. ``exact``: identical bytes;
3. ``statistics``: the pivot token that most often starts at the same character as
   the source token over the corpus (sparse counts of co-aligned pairs), ties
   broken by edit distance (MinED);
4. ``edit_distance``: the pivot token with the smallest edit distance.

The map is an int array (source id → pivot id, −1 when unmapped) plus the method
that found each entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

METHODS = ("unmapped", "special", "exact", "statistics", "edit_distance")
UNMAPPED, SPECIAL, EXACT, STATISTICS, EDIT_DISTANCE = range(len(METHODS))
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_DECODER = _gpt2_byte_decoder()


def tokenizer_scheme(tokenizer) -> str:
    """How the tokenizer writes text in its vocabulary: ``byte_level``, ``metaspace``, ``wordpiece`` or ``plain``."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    text = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")}, ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"WordPiece"' in text or spec.get("model", {}).get("type") == "WordPiece":
        return "wordpiece"
    if "▁" in text or '"Metaspace"' in text:
        return "metaspace"
    return "plain"


def token_bytes(token: str, scheme: str) -> bytes:
    """The text a vocabulary entry stands for, as UTF-8 bytes."""
    if scheme == "byte_level":
        if all(c in BYTE_DECODER for c in token):
            return bytes(BYTE_DECODER[c] for c in token)
        return token.encode("utf-8")
    m = BYTE_PIECE.match(token)
    if m:
        return bytes([int(m.group(1), 16)])
    if scheme == "metaspace":
        return token.replace("▁", " ").encode("utf-8")
    if scheme == "wordpiece" and token.startswith("##"):
        return token[2:].encode("utf-8")
    return token.encode("utf-8")


def token_texts(tokenizer) -> list[bytes]:
    """Bytes of every id of the tokenizer (index = id); ids without a token give b''."""
    scheme = tokenizer_scheme(tokenizer)
    vocab = tokenizer.get_vocab()
    out = [b""] * (max(vocab.values()) + 1 if vocab else 0)
    for tok, i in vocab.items():
        out[i] = token_bytes(tok, scheme)
    return out


def comparable(b: bytes) -> str:
    """Token text for edit distances: decoded leniently, space markers gone."""
    return b.decode("utf-8", errors="replace").strip()


def _special_roles(tokenizer) -> dict[str, int]:
    roles = {}
    for role in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, role, None)
        if value is not None:
            roles[role] = value
    return roles


def _special_ids(tokenizer) -> dict[str, int]:
    """Special tokens by text."""
    vocab = tokenizer.get_vocab()
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content in vocab} | {
        t: vocab[t] for t in tokenizer.all_special_tokens if t in vocab
    }


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (by role and by text)."""
    return set(_special_ids(tokenizer).values()) | set(_special_roles(tokenizer).values())


@dataclass
class VocabMap:
    pivot_id: np.ndarray  # (V_source,) int64, -1 where unmapped
    method: np.ndarray  # (V_source,) int8, index into METHODS

    def coverage(self, ids: np.ndarray | None = None) -> dict[str, int]:
        """Source ids per mapping method; over ``ids`` only when given."""
        method = self.method if ids is None else self.method[ids]
        return {name: int((method == code).sum()) for code, name in enumerate(METHODS)}

    def save(self, path) -> None:
        np.savez(path, pivot_id=self.pivot_id, method=self.method)

    @classmethod
    def load(cls, path) -> VocabMap:
        with np.load(path, allow_pickle=False) as data:
            return cls(pivot_id=data["pivot_id"], method=data["method"])


def build_vocab_map(source_tok, pivot_tok, pair_counts: dict[tuple[int, int], int] | None = None,
                    edit_distance_fallback: bool = True, needed: np.ndarray | None = None) -> VocabMap:
    """Map every source id to a pivot id. ``pair_counts``: (source id, pivot id) → co-alignments.

    ``needed``: the source ids that projection will look up (those in the source's top-k). When given, the
    edit-distance fallback, quadratic in the vocabularies, runs for these only: with a 256k-token source
    vocabulary the rest would cost minutes and never be read.
    """
    src_bytes = token_texts(source_tok)
    piv_bytes = token_texts(pivot_tok)
    n_src = max(len(src_bytes), len(source_tok))
    pivot_id = np.full(n_src, -1, dtype=np.int64)
    method = np.zeros(n_src, dtype=np.int8)

    piv_special = _special_ids(pivot_tok)
    piv_special_ids = set(piv_special.values())
    src_special = _special_ids(source_tok)
    piv_roles = _special_roles(pivot_tok)
    for role, sid in _special_roles(source_tok).items():
        if role in piv_roles and sid < n_src:
            pivot_id[sid], method[sid] = piv_roles[role], SPECIAL
    for text, sid in src_special.items():
        if method[sid] == UNMAPPED and text in piv_special:
            pivot_id[sid], method[sid] = piv_special[text], SPECIAL
    src_special_ids = set(src_special.values())

    # Exact: the lowest pivot id with the same bytes, special tokens aside.
    by_bytes: dict[bytes, int] = {}
    for pid, b in enumerate(piv_bytes):
        if b and pid not in piv_special_ids and b not in by_bytes:
            by_bytes[b] = pid
    for sid, b in enumerate(src_bytes):
        if method[sid] == UNMAPPED and sid not in src_special_ids and b in by_bytes:
            pivot_id[sid], method[sid] = by_bytes[b], EXACT

    if pair_counts:
        best: dict[int, tuple[int, int, int]] = {}  # sid -> (count, -distance, -pid) largest wins
        from rapidfuzz.distance import Levenshtein

        for (sid, pid), count in pair_counts.items():
            if sid >= n_src or method[sid] != UNMAPPED or pid in piv_special_ids:
                continue
            current = best.get(sid)
            if current is not None and current[0] > count:
                continue
            dist = Levenshtein.distance(comparable(src_bytes[sid]), comparable(piv_bytes[pid]))
            key = (count, -dist, -pid)
            if current is None or key > current:
                best[sid] = key
        for sid, (_, _, neg_pid) in best.items():
            pivot_id[sid], method[sid] = -neg_pid, STATISTICS

    if edit_distance_fallback:
        ids = range(len(src_bytes)) if needed is None else sorted({int(i) for i in needed if 0 <= i < len(src_bytes)})
        todo = [sid for sid in ids if method[sid] == UNMAPPED and src_bytes[sid] and sid not in src_special_ids]
        if todo:
            candidates = [pid for pid, b in enumerate(piv_bytes) if b and pid not in piv_special_ids]
            nearest = _nearest_by_edit_distance([comparable(src_bytes[s]) for s in todo],
                                                [comparable(piv_bytes[p]) for p in candidates])
            for sid, c in zip(todo, nearest):
                pivot_id[sid], method[sid] = candidates[c], EDIT_DISTANCE
    return VocabMap(pivot_id, method)


def _nearest_by_edit_distance(queries: list[str], choices: list[str], chunk: int = 2048) -> np.ndarray:
    """Index of the closest choice for each query (lowest index among ties)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out = np.zeros(len(queries), dtype=np.int64)
    for a in range(0, len(queries), chunk):
        d = cdist(queries[a : a + chunk], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        out[a : a + chunk] = d.argmin(axis=1)
    return out
