"""Alignment, vocabulary mapping, projection and fusion on hand-built inputs with known answers."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fusechat.align.project import (
    ALIGNED,
    DROPPED,
    NO_TARGET,
    ONE_HOT,
    merge_duplicate_ids,
    predicting_positions,
    project,
)
from fusechat.align.sequence import (
    align_dtw,
    align_dtw_reference,
    align_offsets,
    dtw_matrix,
    dtw_path,
    dtw_reference,
    group_kinds,
    levenshtein_reference,
    path_to_groups,
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
