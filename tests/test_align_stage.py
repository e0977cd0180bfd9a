"""The align and fuse stages end to end on the tiny zoo."""

import json
import shutil

import numpy as np
import pytest
from conftest import CONVERSATIONS, write_config, write_jsonl
from tokenizers import normalizers
from transformers import AutoTokenizer

from fusechat import align, fuse, prepare, represent
from fusechat.align.project import ALIGNED, NO_TARGET, ONE_HOT, softmax_rows
from fusechat.align.vocab import VocabMap
from fusechat.config import load_config
from fusechat.errors import FusechatError
from fusechat.shards import read_aligned, read_fused, read_representation


def run_until(config_path, stage):
    cfg = load_config(config_path)
    prepare.run(cfg)
    represent.run(cfg)
    outs = align.run(cfg)
    if stage == "fuse":
        outs = fuse.run(cfg)
    return cfg, outs


def same_distributions(ids_a, probs_a, ids_b, probs_b, atol=2e-3):
    """Row by row, the same probability for each id (the order of equal probabilities may differ)."""
    for ia, pa, ib, pb in zip(ids_a, probs_a, ids_b, probs_b):
        order_a, order_b = np.argsort(ia, kind="stable"), np.argsort(ib, kind="stable")
        np.testing.assert_array_equal(ia[order_a], ib[order_b])
        np.testing.assert_allclose(pa[order_a].astype(np.float32), pb[order_b].astype(np.float32), atol=atol)


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, zoo):
    root = tmp_path_factory.mktemp("fused")
    cfg, _ = run_until(write_config(root, zoo, pivot="llama", sources=("mistral", "gpt2")), "fuse")
    return root / "run", cfg


def test_projected_distributions_cover_every_assistant_position(fused_run):
    run_dir, _ = fused_run
    pivot = {r.seq: r for r in read_representation(run_dir / "represent" / "llama")}
    for source in ("mistral", "gpt2"):
        m = manifest(run_dir / "align" / source)
        targets = sum(int(p.assistant_mask[1:].sum()) for p in pivot.values())
        assert m["positions"]["aligned"] + m["positions"]["one_hot"] == targets
        assert m["positions"]["aligned"] > 0
        cov = m["coverage"]  # how each scored position got its distribution
        assert cov["exact"] + cov["prefix"] == m["positions"]["aligned"]
        assert cov["fallback"] == m["positions"]["one_hot"] and cov["positions"] == targets
        assert cov["prefix"] > 0 and cov["covered_share"] == pytest.approx(m["aligned_share"], abs=1e-4)
        assert sum(m["vocab_coverage"].values()) == m["source_vocab_size"]
        for row in read_aligned(run_dir / "align" / source):
            assert np.isfinite(row.source_ce) and row.source_tokens > 0 and row.source_bytes >= row.source_tokens
            scored = np.zeros(len(row.status), bool)
            scored[:-1] = pivot[row.seq].assistant_mask[1:]
            assert ((row.status == ALIGNED) | (row.status == ONE_HOT)).tolist() == scored.tolist()
            assert (row.status[~scored] == NO_TARGET).all()
            sums = row.probs[scored].astype(np.float32).sum(axis=1)
            np.testing.assert_allclose(sums, 1.0, atol=2e-3)
        assert (run_dir / "align" / source / "vocab_map.npz").exists()


def test_min_ce_choices_follow_the_cross_entropies(fused_run):
    run_dir, _ = fused_run
    pivot = {r.seq: r for r in read_representation(run_dir / "represent" / "llama")}
    for source in ("mistral", "gpt2"):
        src = {r.seq: r for r in read_representation(run_dir / "represent" / source)}
        aligned = {r.seq: r for r in read_aligned(run_dir / "align" / source)}
        counts = {"pivot": 0, source: 0}
        for row in read_fused(run_dir / "fuse" / source):
            p, s = pivot[row.seq], src[row.seq]
            expected = 0 if p.ce <= s.ce else 1
            assert row.choice == expected
            np.testing.assert_allclose(row.candidate_ce, [p.ce, s.ce], rtol=1e-6)
            counts["pivot" if expected == 0 else source] += 1
            if expected == 0:
                in_loss = row.in_loss
                same_distributions(row.ids[in_loss], row.probs[in_loss], p.topk_ids[in_loss],
                                   softmax_rows(p.topk_logits)[in_loss])
            else:
                np.testing.assert_array_equal(row.ids, aligned[row.seq].ids)
        m = manifest(run_dir / "fuse" / source)
        assert m["choices"] == {**counts, "excluded": 0, "gated": 0}
        teachers = m["teachers"]
        assert sum(t["positions"] for t in teachers.values()) == m["positions_in_fusion_loss"]
        assert set(teachers) == {lbl for lbl, n in counts.items() if n}
        for t in teachers.values():
            assert 0 <= t["gold_prob"] <= 1 and 0 <= t["top_is_gold"] <= 1 and t["entropy"] >= 0


def test_pivot_aligned_with_itself_is_the_identity(tmp_path, zoo):
    twin = tmp_path / "twin"
    shutil.copytree(zoo["llama"], twin)
    for method in ("offsets", "dtw"):
        d = tmp_path / method
        d.mkdir()
        _, outs = run_until(write_config(d, {**zoo, "twin": twin}, pivot="llama", sources=("twin",),
                                         align={"method": method}), "align")
        m = manifest(outs[0])
        assert m["positions"]["one_hot"] == 0 and m["positions"]["aligned"] > 0
        assert m["groups"]["one_to_one"] > 0 and m["groups"]["many_to_many"] == 0
        vmap = VocabMap.load(outs[0] / "vocab_map.npz")
        assert (vmap.pivot_id == np.arange(len(vmap.pivot_id))).all()
        pivot = {r.seq: r for r in read_representation(d / "run" / "represent" / "llama")}
        for row in read_aligned(outs[0]):
            p = pivot[row.seq]
            aligned = row.status == ALIGNED
            same_distributions(row.ids[aligned], row.probs[aligned], p.topk_ids[aligned],
                               softmax_rows(p.topk_logits)[aligned])


def test_exact_spans_only_leave_the_prefix_positions_to_the_fallback(tmp_path, fused_run, zoo):
    run_dir, _ = fused_run
    _, outs = run_until(write_config(tmp_path, zoo, pivot="llama", sources=("gpt2",),
                                     align={"prefix": False}), "align")
    exact_only, both = manifest(outs[0])["coverage"], manifest(run_dir / "align" / "gpt2")["coverage"]
    assert exact_only["prefix"] == 0 and exact_only["exact"] == both["exact"]
    assert exact_only["fallback"] == both["fallback"] + both["prefix"] > both["fallback"]


def test_dtw_method_runs_on_different_tokenizers(tmp_path, zoo):
    _, outs = run_until(write_config(tmp_path, zoo, pivot="llama", sources=("mistral",),
                                     align={"method": "dtw"}), "align")
    m = manifest(outs[0])
    assert m["method"] == "dtw" and m["positions"]["aligned"] > 0


def test_drop_option_removes_unaligned_positions(tmp_path, zoo):
    # A character-level pivot: its characters inside a source BPE token have no source distribution.
    _, outs = run_until(write_config(tmp_path, zoo, pivot="gpt2", sources=("llama",),
                                     align={"unaligned": "drop"}), "fuse")
    m = manifest(tmp_path / "run" / "align" / "llama")
    assert m["positions"]["one_hot"] == 0 and m["positions"]["dropped"] > 0
    dropped = m["positions"]["dropped"]
    in_loss = sum(int(r.in_loss.sum()) for r in read_fused(outs[0]) if r.choice == 1)
    aligned = sum(int((r.status == ALIGNED).sum()) for r in read_aligned(tmp_path / "run" / "align" / "llama"))
    assert dropped > 0 and in_loss <= aligned


@pytest.mark.parametrize("method, unit", [("multi", "token"), ("avg_ce", "byte"), ("min_ce", "byte")])
def test_other_fusion_methods(tmp_path, zoo, method, unit):
    cfg, outs = run_until(write_config(tmp_path, zoo, pivot="llama", sources=("mistral", "gpt2"),
                                       fuse={"method": method, "ce_unit": unit}), "fuse")
    names = ["multi"] if method == "multi" else ["mistral", "gpt2"]
    assert [o.name for o in outs] == names
    for out in outs:
        m = manifest(out)
        assert m["method"] == method and m["ce_unit"] == unit
        assert sum(m["choices"].values()) == len(CONVERSATIONS)
        for row in read_fused(out):
            in_loss = row.in_loss
            np.testing.assert_allclose(row.probs[in_loss].astype(np.float32).sum(axis=1), 1.0, atol=2e-3)
    if method == "multi":
        assert set(manifest(outs[0])["choices"]) == {"pivot", "mistral", "gpt2", "excluded", "gated"}


def test_align_before_represent_is_an_error(tmp_path, zoo):
    cfg = load_config(write_config(tmp_path, zoo))
    prepare.run(cfg)
    represent.run(cfg, model="llama")
    with pytest.raises(FusechatError, match=r"no complete representation.*--model mistral"):
        align.run(cfg)


def test_source_from_other_prepared_text_is_an_error(tmp_path, zoo):
    config = write_config(tmp_path, zoo)
    run_until(config, "align")
    cfg = load_config(config, overrides=["prepare.template=chatml"])
    prepare.run(cfg, force=True)
    with pytest.raises(FusechatError, match="made from other inputs"):
        represent.run(cfg, model="llama")  # stale output is never silently kept or replaced
    represent.run(cfg, model="llama", force=True)
    with pytest.raises(FusechatError, match="made from different prepared data"):
        align.run(cfg)


def _with_normalizer(zoo, tmp_path, name, normalizer):
    folder = tmp_path / name
    shutil.copytree(zoo["gpt2"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.normalizer = normalizer
    tok.save_pretrained(folder)
    return {**zoo, name: folder}


def test_declared_unicode_normalisation_is_handled(tmp_path, zoo):
    # The data writes "é" decomposed (e + combining accent); the source's tokenizer declares NFC.
    data = write_jsonl(tmp_path / "nfd.jsonl", [{"id": "n", "conversations": [
        {"from": "human", "value": "hello there"}, {"from": "gpt", "value": "I am fine, cafe\u0301 the"}]}])
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    texts = [t["value"] for c in CONVERSATIONS for t in c["conversations"]] + ["GPT4 Correct User: Assistant café"]
    tok = build_tokenizer("char", texts, eos="<|endoftext|>", bos=None)
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    build_model("gpt2", tok, out_dir=tmp_path / "nfc")
    config = write_config(tmp_path, {**zoo, "nfc": tmp_path / "nfc"}, pivot="llama", sources=("nfc",))
    cfg = load_config(config, overrides=[f"data.paths=[{data}]"])
    prepare.run(cfg)
    represent.run(cfg)
    out = align.run(cfg)[0]
    assert manifest(out)["positions"]["aligned"] > 0


def test_normalisation_that_changes_characters_is_an_error(tmp_path, zoo):
    models = _with_normalizer(zoo, tmp_path, "lower", normalizers.Lowercase())
    cfg = load_config(write_config(tmp_path, models, pivot="llama", sources=("lower",)))
    prepare.run(cfg)
    with pytest.raises(FusechatError, match=r"model 'lower'.*sequence 'a'.*first difference"):
        represent.run(cfg, model="lower")
