"""Tiny tokenizers of the real families, trained with ``tokenizers`` on a few texts.

- ``byte_bpe``: byte-level BPE with ``Ġ`` for spaces (GPT-2, Llama-3, Qwen style).
- ``sp_bpe``: SentencePiece-style BPE with ``▁`` and ``<0xNN>`` byte fallback (Llama-2, Mistral style).
- ``char``: one token per character, unknown characters to ``<unk>``.

They are real ``transformers`` fast tokenizers (saved with ``save_pretrained``),
so every stage exercises the same code paths as with hub models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

KINDS = ("byte_bpe", "sp_bpe", "char")


def build_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int = 400,
    bos: str | None = "<s>",
    eos: str = "</s>",
    unk: str = "<unk>",
    pad: str | None = None,
    extra_special: tuple[str, ...] = (),
    chat_template: str | None = None,
    out_dir: str | Path | None = None,
):
    """Train a tiny tokenizer of family ``kind`` and wrap it as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    specials = [t for t in (unk, bos, eos, pad, *extra_special) if t]
    specials = list(dict.fromkeys(specials))
    if kind == "byte_bpe":
        tok = _byte_bpe(texts, vocab_size, specials)
    elif kind == "sp_bpe":
        tok = _sp_bpe(texts, vocab_size, specials, unk)
    elif kind == "char":
        tok = _char(texts, specials, unk)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk if kind != "byte_bpe" else None,
        pad_token=pad,
        additional_special_tokens=list(extra_special) or None,
    )
    if chat_template:
        wrapped.chat_template = chat_template
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def _byte_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _sp_bpe(texts: list[str], vocab_size: int, specials: list[str], unk: str) -> Tokenizer:
    # Train on the ▁-marked text, then rebuild the model with the 256 <0xNN> byte
    # pieces in its vocabulary so that unseen characters fall back to bytes.
    base = Tokenizer(models.BPE(unk_token=unk))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    base.train_from_iterator(texts, trainer)
    vocab = base.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(base)]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    return tok


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def _char(texts: list[str], specials: list[str], unk: str) -> Tokenizer:
    chars = sorted({c for t in texts for c in t})
    vocab = {s: i for i, s in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok
