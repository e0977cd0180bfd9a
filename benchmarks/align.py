"""Benchmark of sequence alignment on conversations of about 1,000 tokens.

In one run, for a byte-level BPE pivot and a SentencePiece-style source trained on
the same synthetic text:

- ``offsets_vs_tokenize_ratio``: time of ``align_offsets`` over all pairs divided by
  the time to tokenize both sides with offsets (target ≤ 1: alignment adds no more
  than the tokenization itself);
- ``dtw_speedup_vs_reference``: time of the plain O(n·m) Python DTW (Python edit
  distances, double loop) divided by ``align_dtw`` on the same pairs (target ≥ 50).

    python benchmarks/align.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


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


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--dtw-pairs", type=int, default=2, help="pairs timed with the slow reference")
    args = parser.parse_args(argv)

    import numpy as np

    from fusechat.align.sequence import align_dtw, align_dtw_reference, align_offsets
    from fusechat.align.vocab import comparable, token_texts
    from fusechat.zoo.tokenizers import build_tokenizer

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
    t_dtw = best_of(lambda: [align_dtw(a, b) for a, b in pairs], 3)
    started = time.perf_counter()
    reference = [align_dtw_reference(a, b) for a, b in pairs]
    t_reference = time.perf_counter() - started
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
    }
    print(f"conversations: {len(texts)}, mean pivot tokens {result['mean_pivot_tokens']}")
    print(f"tokenize both sides {t_tokenize * 1e3:8.2f} ms   offsets alignment {t_offsets * 1e3:8.2f} ms")
    print(f"offsets_vs_tokenize_ratio {result['offsets_vs_tokenize_ratio']:.3f}   (target <= 1)")
    print(f"dtw {t_dtw:.3f} s vs plain reference {t_reference:.2f} s on {len(pairs)} pairs, same alignment: {same}")
    print(f"dtw_speedup_vs_reference {result['dtw_speedup_vs_reference']:.1f}x   (target >= 50)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
