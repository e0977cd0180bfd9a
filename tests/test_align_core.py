"""Alignment, vocabulary mapping, projection and fusion on hand-built inputs with known answers."""

import numpy as np
import pytest
from references import align_dtw_reference, align_dtw_research, dtw_reference, dtw_research, levenshtein_reference
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fusechat.align.prefix import PrefixProjector, pivot_first_token, top_k
from fusechat.align.project import (
    ALIGNED,
    DROPPED,
    NO_TARGET,
    ONE_HOT,
    merge_duplicate_ids,
    pivot_distribution,
    predicting_positions,
    project,
    project_spans,
)
from fusechat.align.sequence import (
    align_dtw,
    align_offsets,
    byte_spans,
    dtw_matrix,
    dtw_path,
    group_kinds,
    partial_tokens,
    path_to_groups,
    token_boundaries,
    token_distance_matrix,
)
from fusechat.align.vocab import (
    EDIT_DISTANCE,
    EXACT,
    SPECIAL,
    STATISTICS,
    UNMAPPED,
    build_vocab_map,
    token_bytes,
    token_texts,
    tokenizer_scheme,
)
from fusechat.fuse import avg_ce_weights, comparable_ce, min_ce_choice, mix
from fusechat.zoo.tokenizers import build_tokenizer

# ------------------------------------------------------------------ offsets alignment


def test_word_level_against_character_level():
    # "ab cd": words "ab", " cd" against characters a, b, ' ', c, d.
    words = [(0, 2), (2, 5)]
    chars = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert align_offsets(words, chars).tolist() == [[0, 1, 0, 2], [1, 2, 2, 5]]
    assert align_offsets(chars, words).tolist() == [[0, 2, 0, 1], [2, 5, 1, 2]]


def test_many_to_many_group():
    # "abcd": pivot "ab" "cd", source "a" "bc" "d": the only shared start is 0.
    assert align_offsets([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]).tolist() == [[0, 2, 0, 3]]


def test_byte_fallback_pieces_keep_their_span():
    # Pivot: "x" + one token for a 3-byte character; source: "x" + three <0xNN> pieces sharing its span.
    groups = align_offsets([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)])
    assert groups.tolist() == [[0, 1, 0, 1], [1, 2, 1, 4], [2, 3, 4, 5]]
    assert group_kinds(groups) == {"one_to_one": 2, "many_to_one": 0, "one_to_many": 1, "many_to_many": 0,
                                   "one_sided": 0}


def test_bos_joins_the_first_group():
    groups = align_offsets([(0, 0), (0, 2), (2, 4)], [(0, 2), (2, 3), (3, 4)])
    assert groups.tolist() == [[0, 2, 0, 1], [2, 3, 1, 3]]


TEXTS = [
    "GPT4 Correct User: héllo wörld</s>GPT4 Correct Assistant: 你好，世界 🙂🚀</s>",
    "e\u0301 combining  accents   and\n\n\nnewlines\t\ttabs  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n  spaced   out  <|im_end|>\n",
    "emoji 👩‍👩‍👧 family, flags 🇫🇷, math ∑∞ and 日本語のテキスト",
]


@pytest.fixture(scope="module")
def family_tokenizers():
    corpus = ["hello world the correct user assistant GPT4 spaced out accents newlines tabs emoji family"] * 5
    extra = ("<|im_start|>", "<|im_end|>")
    return {kind: build_tokenizer(kind, corpus + TEXTS if kind == "char" else corpus, vocab_size=600,
                                  extra_special=extra) for kind in ("byte_bpe", "sp_bpe", "char")}


def _offsets(tok, text):
    return np.array(tok(text, return_offsets_mapping=True)["offset_mapping"]).reshape(-1, 2)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("pair", [("byte_bpe", "sp_bpe"), ("sp_bpe", "char"), ("char", "byte_bpe")])
def test_groups_cover_both_sequences_once_and_the_same_characters(family_tokenizers, text, pair):
    p_off, s_off = (_offsets(family_tokenizers[k], text) for k in pair)
    groups = align_offsets(p_off, s_off)
    # Exactly once, in order: the group ranges tile [0, n) and [0, m).
    assert groups[0, 0] == 0 and groups[0, 2] == 0
    assert (groups[1:, 0] == groups[:-1, 1]).all() and (groups[1:, 2] == groups[:-1, 3]).all()
    assert groups[-1, 1] == len(p_off) and groups[-1, 3] == len(s_off)
    # Each group's tokens start at the same character on both sides.
    for p0, p1, s0, s1 in groups:
        assert p_off[p0, 0] == s_off[s0, 0]


def test_pivot_aligned_with_itself_is_one_to_one(family_tokenizers):
    for tok in family_tokenizers.values():
        off = _offsets(tok, TEXTS[0])
        groups = align_offsets(off, off)
        spans_shared = len(off) - len(np.unique(off[:, 0]))  # byte pieces sharing a start group together
        assert len(groups) == len(off) - spans_shared


# ------------------------------------------------------------------ DTW


def test_dtw_matrix_matches_the_plain_algorithm_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, m = rng.integers(1, 40, size=2)
        cost = rng.integers(0, 6, size=(n, m))
        np.testing.assert_array_equal(dtw_matrix(cost), dtw_reference(cost))


def test_dtw_alignment_matches_the_reference_on_random_token_strings():
    rng = np.random.default_rng(1)
    alphabet = list("abcde")
    for _ in range(30):
        words = ["".join(rng.choice(alphabet, size=rng.integers(1, 4))) for _ in range(rng.integers(2, 25))]
        other = [w[: rng.integers(1, len(w) + 1)] for w in words if rng.random() > 0.2] or ["a"]
        np.testing.assert_array_equal(align_dtw(words, other), align_dtw_reference(words, other))


def test_edit_distances_match_the_plain_algorithm():
    words = ["", "a", "kitten", "sitting", "flaw", "lawn", "你好", "▁x"]
    fast = token_distance_matrix(words, words)
    assert fast.tolist() == [[levenshtein_reference(a, b) for b in words] for a in words]
    assert levenshtein_reference("kitten", "sitting") == 3


def test_dtw_path_and_groups_by_hand():
    # Edit distances, pivot "the" "cat" "sat" (rows) against source "th" "e" "cat" "sa" "t":
    #   the: 1 2 3 3 2 / cat: 3 3 0 2 2 / sat: 3 3 1 1 2
    # The cheapest path the-th, the-e, cat-cat, sat-sa, sat-t costs 1 + 2 + 0 + 1 + 2 = 6.
    cost = token_distance_matrix(["the", "cat", "sat"], ["th", "e", "cat", "sa", "t"])
    assert cost.tolist() == [[1, 2, 3, 3, 2], [3, 3, 0, 2, 2], [3, 3, 1, 1, 2]]
    D = dtw_matrix(cost)
    assert D[-1, -1] == 6
    assert dtw_path(D) == [(0, 0), (0, 1), (1, 2), (2, 3), (2, 4)]
    groups = align_dtw(["the", "cat", "sat"], ["th", "e", "cat", "sa", "t"])
    assert groups.tolist() == [[0, 1, 0, 2], [1, 2, 2, 3], [2, 3, 3, 5]]
    assert path_to_groups([(0, 0), (1, 0), (2, 1), (2, 2), (3, 3)]).tolist() == [
        [0, 2, 0, 1], [2, 3, 1, 3], [3, 4, 3, 4]]


def test_dtw_identical_sequences_are_one_to_one():
    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    assert align_dtw(tokens, tokens).tolist() == [[i, i + 1, i, i + 1] for i in range(6)]


# ------------------------------------------------------------------ vocabulary


def test_token_bytes_of_each_scheme():
    assert token_bytes("Ġhello", "byte_level") == b" hello"
    assert token_bytes("ĊĊ", "byte_level") == b"\n\n"
    assert token_bytes("ä½ł", "byte_level") == "你".encode()
    assert token_bytes("▁hello", "metaspace") == b" hello"
    assert token_bytes("<0xE4>", "metaspace") == b"\xe4"
    assert token_bytes("##ing", "wordpiece") == b"ing"
    assert token_bytes("hi", "plain") == b"hi"


def test_schemes_are_detected(family_tokenizers):
    assert tokenizer_scheme(family_tokenizers["byte_bpe"]) == "byte_level"
    assert tokenizer_scheme(family_tokenizers["sp_bpe"]) == "metaspace"
    assert tokenizer_scheme(family_tokenizers["char"]) == "plain"


def _word_level(vocab, **special):
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def test_vocab_map_each_method_by_hand():
    pivot = _word_level({"<unk>": 0, "</s>": 1, "cat": 2, "dog": 3, "house": 4, "mouse": 5}, eos_token="</s>")
    source = _word_level({"<unk>": 0, "<eos>": 1, "cat": 2, "dogs": 3, "hous": 4, "moose": 5, "zzzz": 6},
                         eos_token="<eos>")
    # "dogs" co-aligned with "dog" 3 times; "moose" with "mouse" and "house" twice each: MinED picks "mouse".
    counts = {(3, 3): 3, (3, 2): 1, (5, 4): 2, (5, 5): 2}
    vmap = build_vocab_map(source, pivot, counts)
    assert vmap.pivot_id.tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert vmap.method.tolist() == [SPECIAL, SPECIAL, EXACT, STATISTICS, EDIT_DISTANCE, STATISTICS, EDIT_DISTANCE]
    assert vmap.coverage() == {"unmapped": 0, "special": 2, "exact": 1, "statistics": 2, "edit_distance": 2}
    no_fallback = build_vocab_map(source, pivot, counts, edit_distance_fallback=False)
    assert no_fallback.method[6] == UNMAPPED and no_fallback.pivot_id[6] == -1
    # Only the ids projection reads get the (quadratic) edit-distance fallback.
    only_used = build_vocab_map(source, pivot, counts, needed=np.array([0, 2, 4]))
    assert only_used.method.tolist() == [SPECIAL, SPECIAL, EXACT, STATISTICS, EDIT_DISTANCE, STATISTICS, UNMAPPED]
    assert only_used.coverage(np.array([0, 2, 4])) == {"unmapped": 0, "special": 1, "exact": 1, "statistics": 0,
                                                       "edit_distance": 1}


def test_vocab_map_between_byte_level_and_sentencepiece(family_tokenizers):
    src, piv = family_tokenizers["sp_bpe"], family_tokenizers["byte_bpe"]
    vmap = build_vocab_map(src, piv, edit_distance_fallback=False)
    src_vocab, piv_vocab = src.get_vocab(), piv.get_vocab()
    assert vmap.pivot_id[src_vocab["▁world"]] == piv_vocab["Ġworld"]
    assert vmap.pivot_id[src_vocab["<0x0A>"]] == piv_vocab["Ċ"]
    assert vmap.pivot_id[src.eos_token_id] == piv.eos_token_id
    assert vmap.pivot_id[src_vocab["<|im_end|>"]] == piv_vocab["<|im_end|>"]
    assert sum(vmap.coverage().values()) == len(vmap.pivot_id)


# ------------------------------------------------------------------ projection


def test_merge_duplicate_ids_adds_and_drops():
    ids = np.array([[4, 7, 4, -1], [2, 2, 2, 2]])
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    out_ids, out_p = merge_duplicate_ids(ids, probs)
    assert out_ids.tolist() == [[4, 7, 0, 0], [2, 0, 0, 0]]
    np.testing.assert_allclose(out_p, [[0.6, 0.3, 0, 0], [1.0, 0, 0, 0]], rtol=1e-6)


def test_projection_by_hand():
    # Pivot tokens t0..t4; assistant tokens t2, t3, t4 (so positions 1, 2, 3 are scored).
    pivot_ids = np.array([10, 11, 12, 13, 14])
    target = np.array([False, False, True, True, True])
    # Groups: t0|s0, t1|s1, t2 t3|s2 (many-to-one), t4|s3 s4.
    groups = np.array([[0, 1, 0, 1], [1, 2, 1, 2], [2, 4, 2, 3], [4, 5, 3, 5]])
    assert [p.tolist() for p in predicting_positions(groups)] == [[0, 1, 3], [0, 1, 2]]
    # Source top-2 at each of its 5 positions; source ids 0..3 map to pivot 20, 20, 21, -1.
    topk_ids = np.array([[0, 1], [0, 1], [2, 3], [0, 2], [1, 2]])
    logits = np.log(np.array([[0.5, 0.5], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]]))
    vocab_map = np.array([20, 20, 21, -1])
    proj = project(pivot_ids, target, groups, topk_ids, logits, vocab_map, "one_hot")
    assert proj.status.tolist() == [NO_TARGET, ALIGNED, ONE_HOT, ALIGNED, NO_TARGET]
    # Position 1 (predicts t2) uses source position 1: ids 0 and 1 both map to 20 -> 1.0.
    assert proj.ids[1].tolist() == [20, 0] and proj.probs[1].tolist() == pytest.approx([1.0, 0.0])
    # Position 2 predicts t3, inside a group: one-hot on the gold token 13.
    assert proj.ids[2].tolist() == [13, 0] and proj.probs[2].tolist() == pytest.approx([1.0, 0.0])
    # Position 3 predicts t4 from source position 2: id 2 -> 21 (0.9), id 3 unmapped, renormalised.
    assert proj.ids[3].tolist() == [21, 0] and proj.probs[3].tolist() == pytest.approx([1.0, 0.0])
    dropped = project(pivot_ids, target, groups, topk_ids, logits, vocab_map, "drop")
    assert dropped.status.tolist() == [NO_TARGET, ALIGNED, DROPPED, ALIGNED, NO_TARGET]


# ------------------------------------------------------------------ fusion rules


def test_min_ce_choice_and_avg_weights():
    assert min_ce_choice([1.2, 0.8, 0.8], [True, True, True]) == 1
    assert min_ce_choice([1.2, 0.8], [True, False]) == 0
    assert min_ce_choice([float("nan"), 0.9], [True, True]) == 1
    assert min_ce_choice([1.0, 2.0], [False, False]) == -1
    np.testing.assert_allclose(avg_ce_weights([0.0, np.log(3.0)], [True, True]), [0.75, 0.25])
    np.testing.assert_allclose(avg_ce_weights([0.5, 0.1], [True, False]), [1.0, 0.0])


def test_ce_per_byte():
    # 2 nats/token over 10 tokens of 40 bytes: 0.5 nats per byte.
    assert comparable_ce(2.0, 10, 40, "byte") == 0.5
    assert comparable_ce(2.0, 10, 40, "token") == 2.0


def test_mix_by_hand():
    a = (np.array([[1, 2]]), np.array([[0.5, 0.5]]), np.array([True]))
    b = (np.array([[2, 3]]), np.array([[1.0, 0.0]]), np.array([True]))
    ids, probs, present = mix([a, b], np.array([0.5, 0.5]), k=2)
    # id 2: 0.25 + 0.5 = 0.75, id 1: 0.25 (id 3 has no mass); renormalised over the top 2.
    assert ids.tolist() == [[2, 1]] and probs.tolist()[0] == pytest.approx([0.75, 0.25])
    absent = (b[0], b[1], np.array([False]))
    ids, probs, _ = mix([a, absent], np.array([0.5, 0.5]), k=2)
    assert probs.tolist()[0] == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------------ byte-exact alignment


def _gpt2_style_source():
    """Byte-level BPE whose only merges are "Say" and "Ġæ" (a space + the first byte of 日)."""
    from tokenizers import decoders

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "æ"), ("S", "a"), ("Sa", "y")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _sp_pivot(normalize_nfc: bool = False):
    """Mistral/Llama-2 style: ▁ for spaces, <0xNN> byte fallback; knows "▁Say", "▁" and "日", not 本 or 語."""
    from tokenizers import decoders, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "S", "a", "y", "c", "f", "e", "日", "▁S", "▁Sa", "▁Say"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "S"), ("▁S", "a"), ("▁Sa", "y")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    steps = [normalizers.NFC()] if normalize_nfc else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _encode(tok, text, add_special_tokens=False):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    return ids, byte_spans(enc["offset_mapping"], text, ids, token_texts(tok)), tok.convert_ids_to_tokens(ids)


def _named_groups(text, pivot, source):
    p_ids, p_spans, p_tok = _encode(pivot, text)
    s_ids, s_spans, s_tok = _encode(source, text)
    return [(p_tok[a:b], s_tok[c:d]) for a, b, c, d in align_offsets(p_spans, s_spans)]


def test_byte_level_token_ending_inside_a_character_makes_no_false_cut():
    text = "Say 日本語"
    pivot, source = _sp_pivot(), _gpt2_style_source()
    _, s_spans, s_tok = _encode(source, text)
    assert s_tok[:4] == ["Say", "Ġæ", "Ĺ", "¥"]
    assert s_spans[:4].tolist() == [[0, 3], [3, 5], [5, 6], [6, 7]]  # character offsets say (3,5), (4,5), (4,5)
    _, p_spans, p_tok = _encode(pivot, text)
    assert p_tok[:4] == ["▁Say", "▁", "日", "<0xE6>"]
    assert p_spans.tolist() == [[0, 3], [3, 4], [4, 7], [7, 8], [8, 9], [9, 10], [10, 11], [11, 12], [12, 13]]
    groups = _named_groups(text, pivot, source)
    assert groups[:2] == [(["▁Say"], ["Say"]), (["▁", "日"], ["Ġæ", "Ĺ", "¥"])]
    # Byte fallback against byte-level: every byte of 本 and 語 is its own one-to-one group.
    assert groups[2:] == [([f"<0x{b:02X}>"], [c]) for b, c in zip("本語".encode(), "æľ¬èªŀ")]


def test_partial_tokens_are_recognised():
    pieces = [b"a", b" \xe6", b"\x97", b"\xa5", b"\xe6\x97\xa5", b"\xf0\x9f", b"\xe6\x97\xa5\xe6", b"", b"\xc3\xa9"]
    assert partial_tokens(pieces).tolist() == [False, True, True, True, False, True, True, False, False]


def test_nfd_text_read_by_an_nfc_tokenizer_keeps_whole_characters():
    # "cafe\u0301": the pivot normalises to é (2 bytes, byte-fallback pieces), the text has e + U+0301 (3 bytes).
    text = "cafe\u0301 日"
    pivot, source = _sp_pivot(normalize_nfc=True), _gpt2_style_source()
    _, p_spans, p_tok = _encode(pivot, text)
    assert p_tok[4:6] == ["<0xC3>", "<0xA9>"]
    # The tokenizer reports both pieces at the "e" only; their bytes are not the text's, so they share that span
    # and no boundary falls between them.
    assert p_spans[4:6].tolist() == [[3, 4], [3, 4]]
    assert token_boundaries(p_spans).tolist() == [0, 1, 2, 3, 6, 7]
    groups = _named_groups(text, pivot, source)
    assert (["<0xC3>", "<0xA9>"], ["e", "Ì", "ģ"]) in groups
    for p, s in groups:
        assert p and s


def test_special_tokens_and_leading_space_markers():
    text = "<s>Say 日</s>"
    pivot, source = _sp_pivot(), _gpt2_style_source()
    source.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    _, p_spans, p_tok = _encode(pivot, text)
    _, s_spans, s_tok = _encode(source, text)
    assert p_tok[0] == "<s>" and s_tok[0] == "<s>" and p_tok[-1] == "</s>" and s_tok[-1] == "</s>"
    assert p_spans[0].tolist() == s_spans[0].tolist() == [0, 3]
    assert p_spans[-1].tolist() == s_spans[-1].tolist() == [10, 14]
    groups = _named_groups(text, pivot, source)
    assert groups[0] == (["<s>"], ["<s>"]) and groups[-1] == (["</s>"], ["</s>"])
    # "▁Say" (" Say" in its vocabulary) and "Say" cover the same three bytes of the text.
    assert (["▁Say"], ["Say"]) in groups


def test_character_offsets_alone_no_longer_cut_inside_a_token():
    # Character offsets of "Say 日": Ġæ spans (3, 5) and Ĺ starts at 4, inside it: no boundary at 4.
    assert token_boundaries([(0, 3), (3, 5), (4, 5), (4, 5)]).tolist() == [0, 3]
    assert align_offsets([(0, 3), (3, 4), (4, 5)], [(0, 3), (3, 5), (4, 5), (4, 5)]).tolist() == [
        [0, 1, 0, 1], [1, 3, 1, 4]]


# ------------------------------------------------------------------ prefix projection


def _brute_force(u, emitted, source_ids, topk, probs, source_bytes, pivot_bytes):
    """Enumerate every continuation the source's distributions describe: along the tokens it actually
    read, each of its top-k; off that path the rest is unknown. Each continuation's mass goes to the
    longest pivot token that its known bytes begin with."""
    out = {}

    def longest(x):
        best, size = -1, 0
        for pid, b in enumerate(pivot_bytes):
            if b and x.startswith(b) and len(b) > size:
                best, size = pid, len(b)
        return best

    def add(x, w):
        pid = longest(x)
        if pid >= 0:
            out[pid] = out.get(pid, 0.0) + w

    def walk(v, known, w, first):
        if v >= len(source_ids):
            add(known, w)
            return
        for sid, q in zip(topk[v - 1].tolist(), probs[v - 1].tolist()):
            b = source_bytes[sid]
            if first:
                if not b.startswith(emitted):
                    continue
                b = b[len(emitted):]
                if not b and sid != source_ids[v]:
                    continue
            if sid == source_ids[v]:
                walk(v + 1, known + b, w * q, False)
            else:
                add(known + b, w * q)

    walk(u, b"", 1.0, True)
    return out


def test_prefix_projection_matches_brute_force_on_tiny_vocabularies():
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"b", b"c"]
    for trial in range(60):
        def vocab(n):
            words = set(alphabet)
            while len(words) < n:
                words.add(b"".join(rng.choice(alphabet, size=rng.integers(2, 5)).tolist()))
            return sorted(words)

        source_bytes, pivot_bytes = vocab(9), vocab(8)
        S, k = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        source_ids = rng.integers(0, len(source_bytes), size=S)
        topk = np.stack([rng.permutation(len(source_bytes))[:k] for _ in range(S)])
        for v in range(1, S):  # the token read next is usually, not always, in the top-k
            if rng.random() < 0.8:
                topk[v - 1, rng.integers(0, k)] = source_ids[v]
        probs = rng.dirichlet(np.ones(k), size=S)
        u = int(rng.integers(1, S))
        actual = source_bytes[source_ids[u]]
        emitted = actual[: int(rng.integers(0, len(actual)))]
        proj = PrefixProjector(pivot_bytes, source_bytes)
        got = proj.position(u, emitted, source_ids, topk, probs)
        want = _brute_force(u, emitted, source_ids, topk, probs, source_bytes, pivot_bytes)
        assert set(got) == set(want), trial
        for pid in want:
            assert got[pid] == pytest.approx(want[pid], abs=1e-12)
        ids, p = top_k(got, 3)
        kept = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        if kept:
            assert ids[: len(kept)].tolist() == [pid for pid, _ in kept]
            np.testing.assert_allclose(p[: len(kept)], np.array([w for _, w in kept]) / sum(w for _, w in kept),
                                       rtol=1e-6)


def test_prefix_projection_by_hand():
    # Source "a" + "bc"; the pivot has "ab" (longer than the source's "a") and "c".
    source_bytes = [b"a", b"bc", b"b", b"x"]
    pivot_bytes = [b"a", b"ab", b"b", b"c", b"x", b"abc"]
    source_ids = np.array([3, 0, 1])
    topk = np.array([[0, 3], [1, 2], [0, 3]])
    probs = np.array([[0.75, 0.25], [0.6, 0.4], [0.5, 0.5]])
    proj = PrefixProjector(pivot_bytes, source_bytes)
    # At the start of "a": "a" is followed, "abc" gets 0.75 * 0.6, "ab" 0.75 * 0.4 (source "b"), "x" 0.25.
    assert proj.position(1, b"", source_ids, topk, probs) == pytest.approx({5: 0.45, 1: 0.3, 4: 0.25})
    # Inside "bc" after "b": only "bc" agrees with the emitted byte; what follows it is "c".
    assert proj.position(2, b"b", source_ids, topk, probs) == pytest.approx({3: 0.6})


def _tiny_byte_level_bpe():
    """A byte-level BPE pivot: "\n" + up to four spaces, " return", and "ass" + "istant" for "assistant" though
    "assist" is a token too (its merge ranks last)."""
    chars = ["Ċ", "Ġ", "r", "e", "t", "u", "n", "x", "a", "s", "i", ":"]
    merges = [("Ċ", "Ġ"), ("ĊĠ", "Ġ"), ("ĊĠĠ", "Ġ"), ("ĊĠĠĠ", "Ġ"), ("Ġ", "r"), ("Ġr", "e"), ("Ġre", "t"),
              ("Ġret", "u"), ("Ġretu", "r"), ("Ġretur", "n"), ("a", "s"), ("as", "s"), ("i", "s"), ("is", "t"),
              ("ist", "a"), ("ista", "n"), ("istan", "t"), ("ass", "ist")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_prefix_projection_gives_the_text_to_the_token_the_pivot_writes():
    # Text "x\n    return": the source reads "\n", "   ", " return"; the pivot writes "\n   ", " return" and
    # also has "\n    " in its vocabulary, which it never writes before a word.
    pivot = _tiny_byte_level_bpe()
    pivot_bytes = token_texts(pivot)
    pid = {b: i for i, b in enumerate(pivot_bytes)}
    source_bytes = [b"\n", b"   ", b" return", b"    ", b"x"]
    source_ids = np.array([4, 0, 1, 2])
    topk = np.array([[0, 4], [1, 3], [2, 4], [0, 4]])
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.8, 0.2], [1.0, 0.0]])
    first_token = pivot_first_token(pivot)
    assert [first_token(x) for x in (b"\n    return", b"\n    ", b"\n   x", b"assistant:")] == [
        pid[b"\n   "], None, pid[b"\n  "], pid[b"ass"]]
    written = PrefixProjector(pivot_bytes, source_bytes, first_token=first_token)
    assert written.longest(b"assistant:") == pid[b"ass"] and written.longest(b"assistant") == pid[b"assist"]
    # The text itself (0.9 · 0.75 · 0.8) goes to "\n   "; the source's "    " (0.9 · 0.25) may end its piece, so it
    # keeps the longest prefix "\n    "; "\n   x" (0.9 · 0.75 · 0.2) the pivot writes "\n  ", " x"; "x" (0.1).
    assert written.position(1, b"", source_ids, topk, probs) == pytest.approx(
        {pid[b"\n   "]: 0.54, pid[b"\n    "]: 0.225, pid[b"\n  "]: 0.135, pid[b"x"]: 0.1})
    # By longest prefix alone, the text itself would go to "\n    ".
    longest = PrefixProjector(pivot_bytes, source_bytes)
    assert longest.position(1, b"", source_ids, topk, probs) == pytest.approx(
        {pid[b"\n    "]: 0.765, pid[b"\n   "]: 0.135, pid[b"x"]: 0.1})


def test_no_first_token_where_the_pivot_marks_the_first_word():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "▁a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert pivot_first_token(PreTrainedTokenizerFast(tokenizer_object=tok)) is None
    assert pivot_first_token(_tiny_byte_level_bpe()) is not None


def test_copy_of_the_pivot_gives_back_its_own_distribution(family_tokenizers):
    tok = family_tokenizers["byte_bpe"]
    text = TEXTS[0]
    ids, spans, _ = _encode(tok, text, add_special_tokens=True)
    rng = np.random.default_rng(1)
    T, k = len(ids), 5
    topk = np.stack([rng.permutation(len(tok))[:k] for _ in range(T)])
    logits = np.sort(rng.normal(size=(T, k)), axis=1)[:, ::-1].astype(np.float16)
    vmap = build_vocab_map(tok, tok)
    b = token_texts(tok)
    proj = project_spans(ids, np.ones(T, bool), spans, ids, spans, topk, logits, vmap.pivot_id,
                         PrefixProjector(b, b), text.encode(), "one_hot")
    assert proj.counts() == {"exact": T - 1, "prefix": 0, "fallback": 0}
    want_ids, want_probs, _ = pivot_distribution(topk, logits, np.ones(T, bool))
    for i in range(T - 1):
        got = dict(zip(proj.ids[i].tolist(), proj.probs[i].tolist()))
        want = dict(zip(want_ids[i].tolist(), want_probs[i].tolist()))
        assert got == pytest.approx(want, abs=1e-6)


def test_projection_fills_pieces_inside_a_group():
    # "Say 日本語": pivot ▁ 日 <0xE6>... against GPT-2 style bytes; every pivot position gets a distribution.
    text = "Say 日本語"
    pivot, source = _sp_pivot(), _gpt2_style_source()
    p_ids, p_spans, _ = _encode(pivot, text)
    s_ids, s_spans, _ = _encode(source, text)
    p_bytes, s_bytes = token_texts(pivot), token_texts(source)
    S, k = len(s_ids), 3
    topk = np.zeros((S, k), dtype=np.int64)
    topk[:-1, 0] = s_ids[1:]
    topk[:, 1:] = [source.convert_tokens_to_ids("a"), source.convert_tokens_to_ids("Ġ")]
    logits = np.tile(np.array([0.0, -2.0, -3.0], dtype=np.float16), (S, 1))
    vmap = build_vocab_map(source, pivot)
    mask = np.ones(len(p_ids), bool)
    exact_only = project_spans(p_ids, mask, p_spans, s_ids, s_spans, topk, logits, vmap.pivot_id, None,
                               text.encode(), "one_hot")
    proj = project_spans(p_ids, mask, p_spans, s_ids, s_spans, topk, logits, vmap.pivot_id,
                         PrefixProjector(p_bytes, s_bytes), text.encode(), "one_hot")
    assert exact_only.counts() == {"exact": 6, "prefix": 0, "fallback": 2}
    assert proj.counts() == {"exact": 6, "prefix": 2, "fallback": 0}
    # Position 0 predicts "▁": the source's "Ġæ" continues into 日, which the pivot writes as "▁" then "日".
    assert p_bytes[proj.ids[0, 0]] == b" "
    # Position 1 predicts "日", inside "Ġæ" after its space: "Ġæ" + "Ĺ" + "¥" is 日.
    assert p_bytes[proj.ids[1, 0]] == "日".encode()
    for i in range(len(p_ids) - 1):
        assert p_bytes[proj.ids[i, 0]][:1] == p_bytes[p_ids[i + 1]][:1]


@pytest.mark.parametrize("seed", [0, 1])
def test_dtw_agrees_with_the_research_algorithm(seed):
    pytest.importorskip("editdistance")
    rng = np.random.default_rng(seed)
    words = ["the", "th", "e", "cat", "ca", "t", "sat", "s", "at", "", "日本", "語"]
    a = [words[i] for i in rng.integers(0, len(words), size=40)]
    b = [words[i] for i in rng.integers(0, len(words), size=33)]
    assert np.array_equal(align_dtw(a, b), align_dtw_research(a, b))
    assert np.array_equal(dtw_matrix(token_distance_matrix(a, b)), dtw_research(a, b).astype(np.int64))


def test_max_ce_gates_a_sequence_that_no_candidate_knows_well():
    from fusechat.align.project import ALIGNED, NO_TARGET
    from fusechat.fuse import EXCLUDED, GATED, fuse_sequence
    from fusechat.shards import AlignedRow, SequenceRep

    mask = np.array([False, True, True])  # tokens 1 and 2 are the answer: positions 0 and 1 are scored
    pivot = SequenceRep(0, "a", np.array([5, 6, 7]), np.zeros((3, 2), int), mask,
                        np.array([[6, 1], [7, 1], [1, 2]]), np.zeros((3, 2), np.float16),
                        ce=0.8, assistant_tokens=2, assistant_bytes=4, finite=True)
    status = np.array([ALIGNED, ALIGNED, NO_TARGET], np.int8)
    source = AlignedRow(0, "a", np.array([[6, 3], [7, 3], [0, 0]]), np.array([[0.9, 0.1], [0.9, 0.1], [0, 0]]),
                        status, source_ce=1.0, source_tokens=4, source_bytes=4, source_finite=True)
    # per byte: pivot 0.8 * 2 / 4 = 0.4, source 1.0 * 4 / 4 = 1.0 → the pivot is the best candidate
    kept = fuse_sequence("min_ce", pivot, [source], "byte", 2, max_ce=0.4)
    assert kept.choice == 0 and kept.in_loss.tolist() == [True, True, False]
    gated = fuse_sequence("min_ce", pivot, [source], "byte", 2, max_ce=0.39)
    assert gated.choice == GATED and not gated.in_loss.any()
    assert fuse_sequence("avg_ce", pivot, [source], "byte", 2, max_ce=0.39).choice == GATED
    # per token the pivot (0.8) is best again, under a gate of 0.9
    assert fuse_sequence("min_ce", pivot, [source], "token", 2, max_ce=0.9).choice == 0
    source.source_finite, pivot.finite = False, False
    assert fuse_sequence("min_ce", pivot, [source], "byte", 2, max_ce=0.39).choice == EXCLUDED


def test_teacher_sums_measure_the_fused_distribution_against_the_gold_tokens():
    from fusechat.fuse import teacher_summary, teacher_sums
    from fusechat.shards import FusedRow

    input_ids = np.array([4, 6, 7, 9])  # positions 1 and 2 are fused: they teach tokens 7 and 9
    ids = np.array([[0, 0], [7, 3], [3, 9], [0, 0]])
    probs = np.array([[0, 0], [0.5, 0.5], [0.75, 0.25], [0, 0]], np.float32)
    fused = FusedRow(0, "a", ids, probs, np.array([False, True, True, False]), 1, [1.0, 0.5])
    sums = teacher_sums(fused, input_ids)
    # p(gold): 0.5 and 0.25; top token gold: yes (a tie goes to the first) and no; entropy: ln 2 and
    # −(0.75 ln 0.75 + 0.25 ln 0.25)
    entropy = np.log(2) - (0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(sums, [2, 0.75, 1, entropy])
    assert teacher_summary(sums) == {"positions": 2, "gold_prob": 0.375, "top_is_gold": 0.5,
                                     "entropy": round(entropy / 2, 4)}
    fused.in_loss[:] = False
    assert teacher_sums(fused, input_ids).tolist() == [0, 0, 0, 0]
