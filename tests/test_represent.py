import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONVERSATIONS, MODELS, write_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusechat import prepare, represent
from fusechat.config import load_config
from fusechat.errors import FusechatError
from fusechat.represent import model_view, to_prepared_offsets, topk_and_ce
from fusechat.shards import read_representation
from fusechat.zoo.architectures import build_model
from fusechat.zoo.tokenizers import build_tokenizer


def prepared_and_represented(config_path, **kwargs):
    cfg = load_config(config_path)
    prepare.run(cfg)
    outs = represent.run(cfg, **kwargs)
    return cfg, outs


def direct_forward(model_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([input_ids], dtype=torch.long)).logits[0]


# ------------------------------------------------------------------ pure functions


def test_model_view_swaps_eos_and_maps_offsets_back():
    text = "ab</s>cd</s>"
    model_text, start_map, end_map = model_view(text, [(2, 6), (8, 12)], "<E>")
    assert model_text == "ab<E>cd<E>"
    # model tokens: "ab" (0,2), "<E>" (2,5), "c" (5,6), "d" (6,7), "<E>" (7,10), bos (0,0)
    offsets = np.array([(0, 2), (2, 5), (5, 6), (6, 7), (7, 10), (0, 0)])
    assert to_prepared_offsets(offsets, start_map, end_map).tolist() == [
        [0, 2], [2, 6], [6, 7], [7, 8], [8, 12], [0, 0]]


def test_model_view_without_eos_spans_is_identity():
    model_text, start_map, end_map = model_view("héllo 🙂", [], "</s>")
    assert model_text == "héllo 🙂"
    offsets = np.array([(0, 1), (1, 5), (5, 7)])
    assert to_prepared_offsets(offsets, start_map, end_map).tolist() == offsets.tolist()


def test_topk_and_ce_by_hand():
    # One sequence of 3 tokens over a vocabulary of 4 (the last id is padding past the tokenizer).
    logits = torch.tensor([[[2.0, 1.0, 0.0, 9.0], [0.0, 0.0, 3.0, 9.0], [1.0, 5.0, 2.0, 9.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, False, True]])  # only token 2 is an assistant token: scored at position 1
    values, topk_ids, ce_sum, count = topk_and_ce(logits, ids, mask, k=2, vocab_limit=3)
    assert topk_ids.tolist() == [[[0, 1], [2, 0], [1, 2]]]
    assert values[0, 2].tolist() == [5.0, 2.0]
    expected = -torch.log_softmax(torch.tensor([0.0, 0.0, 3.0, 9.0]), dim=0)[2]
    assert count.tolist() == [1]
    assert ce_sum[0].item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------ against a direct forward pass


@pytest.mark.parametrize("name", list(MODELS))
def test_topk_and_ce_match_a_direct_forward_pass(tmp_path, zoo, name):
    pivot = "llama" if name != "llama" else "mistral"
    cfg, _ = prepared_and_represented(write_config(tmp_path, zoo, pivot=pivot, sources=(name,)), model=name)
    tok = AutoTokenizer.from_pretrained(zoo[name])
    vocab_limit = len(tok)
    reps = list(read_representation(tmp_path / "run" / "represent" / name))
    assert [r.id for r in reps] == [c["id"] for c in CONVERSATIONS]
    for rep in reps:
        logits = direct_forward(zoo[name], rep.input_ids.astype(np.int64).tolist())
        expected_values, expected_ids = logits[:, :vocab_limit].topk(10, dim=-1)
        np.testing.assert_allclose(rep.topk_logits.astype(np.float32), expected_values.numpy(), rtol=2e-3, atol=2e-3)
        agree = (rep.topk_ids.astype(np.int64) == expected_ids.numpy()).mean()
        assert agree > 0.99  # near-ties may swap places after fp16 rounding
        assert rep.topk_ids.max() < vocab_limit
        targets = torch.tensor(rep.input_ids.astype(np.int64))[1:]
        scored = torch.tensor(rep.assistant_mask[1:])
        ce = F.cross_entropy(logits[:-1][scored], targets[scored])
        assert rep.assistant_tokens == int(scored.sum())
        assert rep.ce == pytest.approx(ce.item(), rel=1e-4)
        assert rep.finite


def test_source_reads_its_own_eos_at_the_template_places(tmp_path, zoo):
    _, outs = prepared_and_represented(write_config(tmp_path, zoo, pivot="llama", sources=("mistral",)))
    from datasets import load_from_disk

    prepared = load_from_disk(str(tmp_path / "run" / "prepared" / "dataset"))
    tok = AutoTokenizer.from_pretrained(zoo["mistral"])
    eos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    for row, rep in zip(prepared, read_representation(outs[1])):
        eos_positions = np.flatnonzero(rep.input_ids == eos_id)
        assert [list(rep.offsets[i]) for i in eos_positions] == row["eos_spans"]
        # The assistant mask covers each answer's closing eos and no user eos.
        closing = {tuple(s) for s in row["eos_spans"] if any(a < s[1] <= b for a, b in row["assistant_spans"])}
        assert {tuple(rep.offsets[i]) for i in eos_positions if rep.assistant_mask[i]} == closing
        text = row["text"]
        assert rep.assistant_bytes == sum(len(text[a:b].encode()) for a, b in row["assistant_spans"])


def test_left_and_right_padding_agree(tmp_path, zoo):
    runs = {}
    for side in ("right", "left"):
        d = tmp_path / side
        d.mkdir()
        cfg, outs = prepared_and_represented(
            write_config(d, zoo, represent={"padding_side": side, "batch_size": 3}), model="llama")
        runs[side] = list(read_representation(outs[0]))
    for a, b in zip(runs["right"], runs["left"]):
        np.testing.assert_allclose(a.topk_logits.astype(np.float32), b.topk_logits.astype(np.float32), atol=2e-3)
        assert a.ce == pytest.approx(b.ce, rel=1e-4)


def test_lean_on_disk(tmp_path, zoo):
    # Enough tokens that a shard's fixed Parquet footer does not dominate.
    many = [{**c, "id": f"{c['id']}{i}"} for i in range(40) for c in CONVERSATIONS]
    config = write_config(tmp_path, zoo, represent={"shard_size": 100, "batch_size": 8})
    write_jsonl(tmp_path / "data.jsonl", many)
    _, outs = prepared_and_represented(config)
    for out in outs:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["top_k"] == 10
        assert manifest["tokens"] >= 4000
        assert manifest["bytes_per_token"] <= 64
        assert manifest["sequences_done"] == len(many)
        assert manifest["nonfinite_sequences"] == 0


# ------------------------------------------------------------------ resume, non-finite


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path, zoo, monkeypatch):
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    _, clean_outs = prepared_and_represented(write_config(clean_dir, zoo), model="llama")
    clean = list(read_representation(clean_outs[0]))

    calls = []
    original = represent.write_shard

    def crash_on_second_shard(path, rows, meta):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(path, rows, meta)

    monkeypatch.setattr(represent, "write_shard", crash_on_second_shard)
    config = write_config(tmp_path, zoo)
    with pytest.raises(KeyboardInterrupt):
        prepared_and_represented(config, model="llama")
    out = tmp_path / "run" / "represent" / "llama"
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]

    monkeypatch.setattr(represent, "write_shard", original)
    calls.clear()
    cfg = load_config(config)
    represent.run(cfg, model="llama")
    resumed = list(read_representation(out))
    assert [r.seq for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(clean, resumed):
        assert a.id == b.id
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logits, b.topk_logits)
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_nonfinite_sequences_are_flagged_and_counted(tmp_path, zoo):
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(zoo["llama"], dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(zoo["llama"]).save_pretrained(broken)
    zoo = {**zoo, "broken": broken}
    _, outs = prepared_and_represented(write_config(tmp_path, zoo, pivot="broken", sources=("llama",)),
                                       model="broken")
    reps = list(read_representation(outs[0]))
    assert not any(r.finite for r in reps)
    assert json.loads((outs[0] / "manifest.json").read_text())["nonfinite_sequences"] == len(CONVERSATIONS)


# ------------------------------------------------------------------ bad input


def test_folder_without_weights(tmp_path, zoo):
    empty = tmp_path / "empty"
    empty.mkdir()
    AutoTokenizer.from_pretrained(zoo["llama"]).save_pretrained(empty)
    (empty / "config.json").write_text((zoo["llama"] / "config.json").read_text())
    with pytest.raises(FusechatError, match=r"model 'empty'.*holds no weights"):
        prepared_and_represented(write_config(tmp_path, {**zoo, "empty": empty}, sources=("empty",)), model="empty")


def test_pickled_weights_are_refused(tmp_path, zoo):
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(zoo["llama"])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(zoo["llama"]).save_pretrained(pickled)
    with pytest.raises(FusechatError, match="only pickled weights"):
        prepared_and_represented(write_config(tmp_path, {**zoo, "pickled": pickled}, sources=("pickled",)),
                                 model="pickled")


def test_not_a_causal_lm(tmp_path, zoo):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    tok = AutoTokenizer.from_pretrained(zoo["llama"])
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(t5)
    tok.save_pretrained(t5)
    with pytest.raises(FusechatError, match=r"model 't5'.*not a causal language model"):
        prepared_and_represented(write_config(tmp_path, {**zoo, "t5": t5}, sources=("t5",)), model="t5")


def test_top_k_larger_than_the_vocabulary(tmp_path, zoo):
    with pytest.raises(FusechatError, match=r"model 'gpt2'.*top_k = 5000 is larger than its vocabulary"):
        prepared_and_represented(write_config(tmp_path, zoo, sources=("gpt2",), represent={"top_k": 5000}),
                                 model="gpt2")


def test_tokenizer_that_does_not_reproduce_the_text(tmp_path, zoo):
    narrow = tmp_path / "narrow"
    tok = build_tokenizer("char", ["abc GPT4 Correct User: Assistant"], eos="</s>")
    build_model("llama", tok, out_dir=narrow)
    with pytest.raises(FusechatError, match=r"model 'narrow'.*does not reproduce the prepared text of sequence 'a'"):
        prepared_and_represented(write_config(tmp_path, {**zoo, "narrow": narrow}, sources=("narrow",)),
                                 model="narrow")


# ------------------------------------------------------------------ two processes


def test_two_processes_give_the_single_process_result(tmp_path, zoo):
    single = tmp_path / "single"
    single.mkdir()
    _, outs = prepared_and_represented(write_config(single, zoo), model="mistral")
    expected = list(read_representation(outs[0]))

    config = write_config(tmp_path, zoo)
    prepare.run(load_config(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "fusechat", "represent", str(config), "--model", "mistral"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run" / "represent" / "mistral"
    got = list(read_representation(out))
    assert [r.seq for r in got] == [r.seq for r in expected]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logits.astype(np.float32), b.topk_logits.astype(np.float32), atol=1e-3)
        assert a.ce == pytest.approx(b.ce, rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sequences_done"] == len(CONVERSATIONS)
    assert manifest["num_processes"] == 2


def test_bf16_runs_and_stays_close_to_fp32(tmp_path, zoo):
    ces = {}
    for dtype in ("fp32", "bf16"):
        d = tmp_path / dtype
        d.mkdir()
        _, outs = prepared_and_represented(write_config(d, zoo, represent={"dtype": dtype}), model="llama")
        ces[dtype] = [r.ce for r in read_representation(outs[0])]
        assert json.loads((outs[0] / "manifest.json").read_text())["dtype"] == dtype
    np.testing.assert_allclose(ces["bf16"], ces["fp32"], rtol=0.05)


# ------------------------------------------------------------------ what a cached representation is made from


def test_model_hash_changes_with_the_weights_not_only_the_config(tmp_path, zoo):
    from fusechat.config import ModelSpec
    from fusechat.model_loading import model_hash

    folder = tmp_path / "model"
    shutil.copytree(zoo["llama"], folder)
    spec = ModelSpec(name="m", path=str(folder))
    before = model_hash(spec)
    assert model_hash(spec) == before  # nothing touched: the same model
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # retrained weights: same size, same config.json
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_hash(spec) != before
    hub = ModelSpec(name="h", path="org/model", revision="abc")
    assert model_hash(hub) == model_hash(ModelSpec(name="other", path="org/model", revision="abc"))
    assert model_hash(hub) != model_hash(ModelSpec(name="h", path="org/model", revision="def"))
