import json

import numpy as np
import pytest
from conftest import openai, sharegpt, write_jsonl
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

from fusechat import prepare
from fusechat.cli import main
from fusechat.config import load_config
from fusechat.data.masks import IGNORE_INDEX, assistant_token_mask
from fusechat.data.templates import CHATML_JINJA
from fusechat.errors import FusechatError
from fusechat.zoo.architectures import build_model
from fusechat.zoo.tokenizers import build_tokenizer

USER = "GPT4 Correct User: "  # 19 characters
ASSISTANT = "GPT4 Correct Assistant: "  # 24 characters


def run_prepare(config_path, **kw):
    cfg = load_config(config_path)
    out = prepare.run(cfg, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    return load_from_disk(str(out / "dataset")), manifest


def labeled_positions(row):
    return [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]


# ------------------------------------------------------------------ masks


def test_mask_overlap_rule_by_hand():
    # bos (0,0) never; a token ending where the span starts is outside; a token
    # that starts one character early (the space before a word) is inside.
    offsets = [(0, 0), (0, 4), (4, 6), (5, 9), (9, 12), (12, 14)]
    spans = [(6, 10), (13, 20)]
    assert assistant_token_mask(offsets, spans).tolist() == [False, False, False, True, True, True]


def test_mask_empty_spans():
    assert assistant_token_mask([(0, 3), (3, 5)], []).tolist() == [False, False]


def test_mask_matches_a_plain_loop_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.choice(60, size=rng.integers(2, 12), replace=False))
        spans = [(int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2])]
        offsets = [tuple(sorted(map(int, rng.integers(0, 62, size=2)))) for _ in range(25)]
        expected = [e > s and any(a < e and s < b for a, b in spans) for s, e in offsets]
        assert assistant_token_mask(offsets, spans).tolist() == expected


# ------------------------------------------------------------------ exact masks


def test_two_turn_conversation_char_level_exact(tmp_path, make_config):
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo", "ok", "no", id="c1")])
    ds, manifest = run_prepare(make_config([data], pivot="char"))
    row = ds[0]
    expected = f"{USER}hi</s>{ASSISTANT}yo</s>{USER}ok</s>{ASSISTANT}no</s>"
    assert row["text"] == expected
    # "yo" starts at 19+2+4+24 = 49; the second "no" at 55+19+2+4+24 = 104. Each span starts one
    # character earlier, at the space after "Assistant:" that the generation prompt leaves to the model.
    assert row["assistant_spans"] == [[48, 55], [103, 110]]
    assert row["eos_spans"] == [[21, 25], [51, 55], [76, 80], [106, 110]]
    # One token per character, "</s>" one token: 21 + 1 + 26 + 1 + 21 + 1 + 26 + 1 = 98 tokens.
    assert row["num_tokens"] == 98
    # 'y' is token 22 + (49 - 25) = 46, then 'o', then '</s>'; 'n' is 71 + (104 - 80) = 95; the space
    # before each is labelled too.
    assert labeled_positions(row) == [45, 46, 47, 48, 94, 95, 96, 97]
    assert row["labels"][45:49] == row["input_ids"][45:49]
    assert row["num_assistant_tokens"] == 8
    assert manifest["complete"] is True
    assert manifest["counts"]["rows"] == 1


def test_two_turn_conversation_byte_bpe(tmp_path, make_config, tokenizer_dirs):
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hello there", "I am fine", "how are you", "nice", id="c1")])
    ds, _ = run_prepare(make_config([data], pivot="byte_bpe"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dirs["byte_bpe"])
    row = ds[0]
    assert tok(row["text"], add_special_tokens=True)["input_ids"] == row["input_ids"]
    # Each assistant turn's labeled tokens read back as " content</s>" or "content</s>" (the
    # space before the content belongs to the first content token in byte-level BPE).
    positions = labeled_positions(row)
    runs, current = [], [positions[0]]
    for p in positions[1:]:
        if p == current[-1] + 1:
            current.append(p)
        else:
            runs.append(current)
            current = [p]
    runs.append(current)
    texts = [tok.decode([row["input_ids"][i] for i in run]) for run in runs]
    assert [t.strip() for t in texts] == ["I am fine</s>", "nice</s>"]


def test_openai_messages_and_system_prompt(tmp_path, make_config):
    record = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "y"}, {"type": "text", "text": "o"}]},
    ]}
    data = write_jsonl(tmp_path / "o.jsonl", [record])
    ds, _ = run_prepare(make_config([data], pivot="char"))
    row = ds[0]
    assert row["text"] == f"be brief</s>{USER}hi</s>{ASSISTANT}yo</s>"
    start = len("be brief</s>") + 19 + 2 + 4 + 23  # the space after "Assistant:", then "yo</s>"
    assert row["assistant_spans"] == [[start, start + 7]]
    assert row["origin"].endswith("o.jsonl:1")
    assert row["id"].endswith("o.jsonl:1")


def test_sharegpt_and_openai_give_the_same_rows(tmp_path, make_config):
    a = write_jsonl(tmp_path / "a.jsonl", [sharegpt("hi", "yo", id="x")])
    b = write_jsonl(tmp_path / "b.jsonl", [openai("hi", "yo", id="x")])
    ds, manifest = run_prepare(make_config([a, b]))
    assert ds[0]["text"] == ds[1]["text"]
    assert ds[0]["labels"] == ds[1]["labels"]
    assert manifest["counts"]["records"] == 2


def test_saved_hf_dataset_and_json_array_inputs(tmp_path, make_config):
    records = [sharegpt("hi", "yo", id="x"), sharegpt("ok", "no", id="y")]
    Dataset.from_list(records).save_to_disk(str(tmp_path / "hfds"))
    (tmp_path / "arr.json").write_text(json.dumps(records))
    ds, manifest = run_prepare(make_config([tmp_path / "hfds", tmp_path / "arr.json"]))
    assert [r["id"] for r in ds] == ["x", "y", "x", "y"]
    assert ds[0]["text"] == ds[2]["text"]
    assert ds[1]["origin"].endswith("hfds[1]")
    assert ds[3]["origin"].endswith("arr.json[1]")


# ------------------------------------------------------------------ templates


def test_tokenizer_chat_template_and_builtin_chatml_agree(tmp_path, make_config):
    tok_dir = tmp_path / "chatml_tok"
    tok = build_tokenizer(
        "char", ["hi yo ok no user assistant system be brief"], extra_special=("<|im_start|>", "<|im_end|>"),
        chat_template=CHATML_JINJA, out_dir=tok_dir,
    )
    build_model("llama", tok, out_dir=tok_dir, hidden=8, layers=1, heads=2)
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo", "ok", "no", id="c")])
    rows = {}
    for template in ("tokenizer", "chatml"):
        cfg = load_config(make_config([data]), overrides=[f"pivot.path={tok_dir}", f"prepare.template={template}",
                                                          f"run_dir={tmp_path / template}"])
        rows[template] = load_from_disk(str(prepare.run(cfg) / "dataset"))[0]
    a, b = rows["tokenizer"], rows["chatml"]
    turn = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert a["text"].startswith(turn)
    assert a["text"] == b["text"]
    assert a["assistant_spans"] == b["assistant_spans"]
    assert a["labels"] == b["labels"]
    # "yo<|im_end|>" is labeled, the newline after it is not.
    start = turn.index("yo")
    assert a["assistant_spans"][0] == [start, start + len("yo<|im_end|>")]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    first = [i for i in a["labels"] if i != IGNORE_INDEX][:3]
    assert tok.convert_ids_to_tokens(first) == ["y", "o", "<|im_end|>"]


def test_tokenizer_template_without_chat_template_is_an_error(tmp_path, make_config):
    tok_dir = tmp_path / "plain"
    build_model("llama", build_tokenizer("char", ["hi yo"], out_dir=tok_dir), out_dir=tok_dir, hidden=8, layers=1,
                heads=2)
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo")])
    cfg = load_config(make_config([data]), overrides=[f"pivot.path={tok_dir}", "prepare.template=tokenizer"])
    with pytest.raises(FusechatError, match="has no chat template"):
        prepare.run(cfg)


# ------------------------------------------------------------------ splitting and truncation


def test_long_conversation_splits_at_turn_boundaries(tmp_path, make_config):
    # Each exchange is 19 + 2 + 1 + 24 + 2 + 1 = 49 char tokens; three of them are 147 > 100.
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo", "ok", "no", "hi", "ok", id="c")])
    ds, manifest = run_prepare(make_config([data], pivot="char", prepare={"max_length": 100}))
    assert [r["id"] for r in ds] == ["c#0", "c#1"]
    assert [r["num_tokens"] for r in ds] == [98, 49]
    assert ds[1]["text"] == f"{USER}hi</s>{ASSISTANT}ok</s>"
    assert all(r["text"].startswith(USER) for r in ds)
    assert manifest["counts"]["split"] == 1
    assert manifest["counts"]["rows"] == 2
    assert manifest["counts"]["truncated"] == 0


def test_split_blocks_repeat_the_system_prompt(tmp_path, make_config):
    # "hi</s>" is 3 tokens: 3 + 98 = 101 > 100, so every exchange is its own block.
    record = sharegpt("hi", "yo", "ok", "no", "hi", "ok", id="c")
    record["system"] = "hi"
    data = write_jsonl(tmp_path / "c.jsonl", [record])
    ds, manifest = run_prepare(make_config([data], pivot="char", prepare={"max_length": 100}))
    assert [r["id"] for r in ds] == ["c#0", "c#1", "c#2"]
    assert all(r["text"].startswith(f"hi</s>{USER}") for r in ds)
    assert [r["num_tokens"] for r in ds] == [52, 52, 52]


def test_single_turn_longer_than_max_length_is_truncated(tmp_path, make_config):
    answer = "yo" * 20  # exchange: 19 + 2 + 1 + 24 + 40 + 1 = 87 tokens
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", answer, id="c"), sharegpt("hi" * 40, "yo", id="d")])
    ds, manifest = run_prepare(make_config([data], pivot="char", prepare={"max_length": 60}))
    assert len(ds) == 1
    row = ds[0]
    assert row["num_tokens"] == 60
    # The answer starts at token 19 + 2 + 1 + 24 = 46 (character 49); 14 of its characters fit,
    # after the space the model writes at token 45 (character 48).
    assert row["text"] == f"{USER}hi</s>{ASSISTANT}" + answer[:14]
    assert labeled_positions(row) == list(range(45, 60))
    assert row["assistant_spans"] == [[48, 63]]
    assert manifest["counts"]["truncated"] == 2
    # The second record's user turn alone exceeds max_length: nothing of the answer is left.
    assert manifest["counts"]["dropped_blocks"] == {"no_assistant_tokens_after_truncation": 1}


def test_a_huge_record_is_cut_before_it_is_tokenized(tmp_path, make_config, monkeypatch):
    # A multi-megabyte answer once cost gigabytes: the whole text was tokenized, with offsets, before the
    # cut. Only the first char_limit characters of a text may reach the tokenizer.
    longest = []
    real_encode = prepare.Preparer._encode

    def encode(self, texts):
        longest.append(max(map(len, texts)))
        return real_encode(self, texts)

    monkeypatch.setattr(prepare.Preparer, "_encode", encode)
    answer = "yo" * 1_000_000
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", answer, id="c"), sharegpt("hi", "short", id="e")])
    ds, manifest = run_prepare(make_config([data], pivot="char", prepare={"max_length": 60}))
    cfg = load_config(tmp_path / "run.yaml")
    limit = prepare.Preparer(AutoTokenizer.from_pretrained(cfg.pivot.path),
                             prepare.get_template("openchat", None), 60).char_limit
    assert max(longest) <= limit < 10_000
    row = ds[0]  # the same cut as for any answer too long to fit
    assert row["num_tokens"] == 60 and row["text"] == f"{USER}hi</s>{ASSISTANT}" + answer[:14]
    assert manifest["counts"]["truncated"] == 1 and len(ds) == 2


# ------------------------------------------------------------------ run directory


def test_rerun_skips_complete_output_and_refuses_stale(tmp_path, make_config):
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo")])
    config = make_config([data])
    _, first = run_prepare(config)
    _, second = run_prepare(config)
    assert second["started_at"] == first["started_at"]  # skipped, not redone
    write_jsonl(data, [sharegpt("hi", "yo"), sharegpt("ok", "no")])
    with pytest.raises(FusechatError, match="--force"):
        run_prepare(config)
    ds, third = run_prepare(config, force=True)
    assert third["counts"]["records"] == 2 and len(ds) == 2


def test_crash_leaves_no_output(tmp_path, make_config, monkeypatch):
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo")] * 3)
    config = make_config([data], prepare={"batch_size": 1})
    calls = []

    def failing_rows(self, conversations):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        yield from original(self, conversations)

    original = prepare.Preparer.rows
    monkeypatch.setattr(prepare.Preparer, "rows", failing_rows)
    with pytest.raises(RuntimeError):
        run_prepare(config)
    run_dir = tmp_path / "run"
    assert not (run_dir / "prepared").exists()
    assert not any(p.name.startswith(".prepared") for p in run_dir.iterdir())
    monkeypatch.setattr(prepare.Preparer, "rows", original)
    ds, manifest = run_prepare(config)
    assert len(ds) == 3 and manifest["complete"]


def test_cli_prepare_with_override(tmp_path, make_config):
    data = write_jsonl(tmp_path / "c.jsonl", [sharegpt("hi", "yo", "ok", "no", id="c")])
    config = make_config([data], pivot="char")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(config), "--set", "prepare.max_length=60"])
    assert exit_info.value.code == 0
    ds = load_from_disk(str(tmp_path / "run" / "prepared" / "dataset"))
    assert [r["id"] for r in ds] == ["c#0", "c#1"]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.prepare.max_length == 60
