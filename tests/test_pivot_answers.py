"""data.pivot_answers: the pivot's own answers to general prompts join the training conversations."""

import json

import pytest
import yaml
from conftest import CONVERSATIONS, write_config

from fusechat import pivot_answers, prepare
from fusechat.config import load_config
from fusechat.data.general_prompts import GENERAL_PROMPTS
from fusechat.errors import DataError
from fusechat.generation import generate_answers
from fusechat.model_loading import load_causal_lm, load_tokenizer


def with_pivot_answers(tmp_path, zoo, **settings):
    path = write_config(tmp_path, zoo, pivot="llama")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["pivot_answers"] = {"max_new_tokens": 6, "batch_size": 2, "device": "cpu", **settings}
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_the_pivots_greedy_answers_are_written_and_prepared_after_the_data(tmp_path, zoo):
    cfg = with_pivot_answers(tmp_path, zoo, count=3)
    out = prepare.run(cfg)
    records = [json.loads(line) for line in pivot_answers.answers_file(cfg).read_text().splitlines()]
    # the same greedy answers, generated here through the pivot's own template
    lm, tok = load_causal_lm(cfg.pivot), load_tokenizer(cfg.pivot)
    items = [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS[:3]]
    expected = generate_answers(lm, tok, items, 6, 2)
    assert [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in records] == [
        (p, a) for p, a in zip(GENERAL_PROMPTS[:3], expected) if a]
    assert [r["id"] for r in records] == [f"pivot-answer-{i}" for i, a in enumerate(expected) if a]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == len(CONVERSATIONS) + len(records)
    assert str(pivot_answers.answers_file(cfg)) in manifest["inputs"]
    # complete: the next prepare skips both
    first = json.loads((pivot_answers.answers_file(cfg).parent / "manifest.json").read_text())["started_at"]
    prepare.run(cfg)
    assert json.loads((pivot_answers.answers_file(cfg).parent / "manifest.json").read_text())["started_at"] == first


def test_prompts_from_a_file_and_their_errors(tmp_path, zoo):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\n\n  Name a colour.  \n", encoding="utf-8")
    cfg = with_pivot_answers(tmp_path, zoo, prompts=str(prompts))
    assert pivot_answers.read_prompts(cfg.data.pivot_answers) == ["Say hello.", "Name a colour."]
    assert pivot_answers.training_paths(cfg)[-1].endswith("pivot_answers/answers.jsonl")
    prompts.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.txt: no prompt in it"):
        prepare.run(cfg)
    prompts.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"prompts.txt: not UTF-8 text \(byte 3\)"):
        prepare.run(cfg)
    missing = with_pivot_answers(tmp_path, zoo, prompts=str(tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match=r"data.pivot_answers.prompts: no file .*nowhere.txt"):
        prepare.run(missing)


def test_sampled_answers_are_seeded_and_are_not_the_greedy_ones(tmp_path, zoo):
    import torch

    for name in "gsao":
        (tmp_path / name).mkdir()
    greedy = with_pivot_answers(tmp_path / "g", zoo, count=4)
    sampled = with_pivot_answers(tmp_path / "s", zoo, count=4, temperature=1.0, seed=3)
    again = with_pivot_answers(tmp_path / "a", zoo, count=4, temperature=1.0, seed=3)
    other = with_pivot_answers(tmp_path / "o", zoo, count=4, temperature=1.0, seed=4)
    texts = {}
    for name, cfg in [("greedy", greedy), ("sampled", sampled), ("again", again), ("other", other)]:
        pivot_answers.run(cfg)
        texts[name] = pivot_answers.answers_file(cfg).read_text()
    assert texts["sampled"] == texts["again"]  # one seed, one set of answers
    assert texts["sampled"] != texts["other"] and texts["sampled"] != texts["greedy"]
    # the same draws by hand: seed, then transformers' sampling from the full distribution at temperature 1
    lm, tok = load_causal_lm(sampled.pivot), load_tokenizer(sampled.pivot)
    items = [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS[:4]]
    torch.manual_seed(3)
    expected = generate_answers(lm, tok, items, 6, 2, temperature=1.0)
    records = [json.loads(line) for line in texts["sampled"].splitlines()]
    assert [r["conversations"][1]["value"] for r in records] == [a for a in expected if a]
    assert json.loads((pivot_answers.answers_file(sampled).parent / "manifest.json").read_text())[
        "settings"]["temperature"] == 1.0
