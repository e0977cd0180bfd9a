"""The prompt pool: prompts without gold answers, answered by the pivot and the sources, scored, and each prompt's
best answer joining the training data of both routes (the explicit route's targets and the implicit route's SFT),
while the SFT baseline keeps to the gold."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

from fusechat.config import PairsConfig
from fusechat.errors import DataError, FusechatError
from fusechat.implicit.pairs import Candidate, build_pairs
from fusechat.implicit.prompts import Prompt, load_prompts
from fusechat.pipeline import load_run, make_ready, route_stages, run_stage


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dirs):
    """A pivot and a source: tiny random Llamas on the byte-level tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    from fusechat.zoo.architectures import build_model

    root = tmp_path_factory.mktemp("pool-models")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_bpe"]))
    for name, seed in (("pivot", 1), ("src", 2)):
        build_model("llama", tokenizer, out_dir=root / name, seed=seed, hidden=32, layers=1)
    return root


def pool_config(tmp_path: Path, models: Path, **sections) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "pivot": {"name": "pivot", "path": str(models / "pivot")},
        "sources": [{"name": "src", "path": str(models / "src")}],
        "synthetic": {"folder": str(tmp_path / "data"), "train": {"reverse": 3, "add": 3},
                      "prompts": {"reverse": 3, "add": 2}, "eval_per_skill": 2},
        "data": {"paths": [str(tmp_path / "data" / "train.jsonl")]},
        "prepare": {"template": "chatml", "max_length": 96},
        "represent": {"dtype": "fp32", "batch_size": 4, "shard_size": 4},
        "train": {"max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 2, "report_to": ["none"],
                  "baselines": ["sft"]},
        "implicit": {"sample": {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 4, "shard_size": 4,
                                "dtype": "fp32", "device": "cpu"},
                     "score": {"scorer": "checker"}, "pairs": {"include_pivot": True}},
        "eval": {"data": [str(tmp_path / "data" / "eval.jsonl")]},
        **sections,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the pool's prompts


def test_pool_prompts_are_the_pools_and_a_prompt_an_eval_item_asks_is_refused(tmp_path, tiny_models):
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "p1", "conversations": [{"from": "human", "value": "Reverse the word kalo."}]},
        {"id": "p2", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 12+30?"}]},
    ])
    items = write_jsonl(tmp_path / "items.jsonl", [
        {"id": "e1", "skill": "add", "kind": "exact", "messages": [{"role": "user", "content": "What is 11+11?"}],
         "answer": "22"}])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}])
    config = pool_config(tmp_path, tiny_models, synthetic=None, data={"paths": [str(gold)], "prompts": [str(pool)]},
                         eval={"data": [str(items)]})
    cfg = load_run(config)
    prompts = load_prompts(cfg)
    assert [(p.id, p.messages) for p in prompts] == [
        ("p1", [{"role": "user", "content": "Reverse the word kalo."}]),
        ("p2", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12+30?"}])]
    # the same question in other whitespace and case is the same question
    write_jsonl(items, [{"id": "e7", "skill": "add", "kind": "exact",
                         "messages": [{"role": "user", "content": " what is  12+30? "}], "answer": "42"}])
    with pytest.raises(DataError, match=rf"{pool}:2 \(record 'p2'\) asks what evaluation item 'e7' of {items} asks"):
        load_prompts(cfg)


def test_a_pool_record_that_holds_its_answer_is_a_bad_record(tmp_path, tiny_models):
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "p1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}])
    cfg = load_run(pool_config(tmp_path, tiny_models, synthetic=None,
                               data={"paths": [str(gold)], "prompts": [str(pool)]}, eval={"data": []}))
    with pytest.raises(DataError, match=r"pool.jsonl:1: a prompt ends on a user turn with no answer; its last turn "
                                        r"is assistant"):
        load_prompts(cfg)


def test_synthetic_pool_prompts_have_no_answer_and_no_held_out_key(tmp_path, tiny_models):
    from fusechat.synthetic.skills import held_out

    cfg = load_run(pool_config(tmp_path, tiny_models))
    make_ready(cfg)
    records = [json.loads(line) for line in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines()]
    assert sorted(r["skill"] for r in records) == ["add"] * 2 + ["reverse"] * 3
    assert all(len(r["conversations"]) == 1 and r["conversations"][0]["from"] == "human" for r in records)
    assert not any(held_out(r["key"]) for r in records)
    train = {json.loads(line)["conversations"][0]["value"]
             for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()}
    assert not train & {r["conversations"][0]["value"] for r in records}  # drawn apart from the mixture
    assert [p.id for p in load_prompts(cfg)] == [r["id"] for r in records]


# ---------------------------------------------------------------- the best answer and who wrote it


def test_the_best_valid_answer_is_kept_with_the_model_that_wrote_it():
    prompts = [Prompt(0, "q0", "pool:1", [{"role": "user", "content": "Reverse the word kalo."}]),
               Prompt(1, "q1", "pool:2", [{"role": "user", "content": "What is 12+30?"}])]
    answers = {0: [Candidate("pivot", 0, "olka", 0.75), Candidate("src", 0, "olak", 1.0),
                   Candidate("src", 1, "ola", 0.8)],
               1: [Candidate("pivot", 0, "41", 0.5), Candidate("src", 0, "43", 0.5)]}
    sets = build_pairs(prompts, answers, PairsConfig(sft_min_score=1.0, include_pivot=True), ["pivot", "src"],
                       "pivot", wrpo=False)
    assert sets.sft == [{"id": "q0", "seq": 0, "model": "src", "sample": 0, "score": 1.0,
                         "messages": [{"role": "user", "content": "Reverse the word kalo."},
                                      {"role": "assistant", "content": "olak"}]}]
    assert sets.report["sft_skipped"] == {"below_sft_min_score": 1}  # no valid answer to 12+30: no training row


# ---------------------------------------------------------------- both routes train on the pool's answers


def test_the_explicit_route_trains_its_targets_on_the_pools_answers_and_sft_on_the_gold(tmp_path, tiny_models):
    from datasets import load_from_disk

    from fusechat.implicit.score import pool_answers_file
    from fusechat.prepare import pooled_rows

    config = pool_config(tmp_path, tiny_models)
    cfg = load_run(config)
    assert route_stages(cfg) == ["sample", "score", "prepare", "represent", "align", "fuse", "train", "merge", "eval"]
    make_ready(cfg)
    for stage in ("sample", "score", "prepare"):
        run_stage(stage, cfg)
    # The run folder moves between prepare and train: the rows' origins still name the old place.
    run = tmp_path / "moved"
    shutil.move(tmp_path / "run", run)
    cfg = load_run(config, [f"run_dir={run}"])
    for stage in ("represent", "align", "fuse", "train"):
        run_stage(stage, cfg)
    best = [json.loads(line) for line in pool_answers_file(cfg).read_text().splitlines()]
    n = len(best)  # a prompt whose every answer came out empty has none
    assert n >= 3 and {b["model"] for b in best} <= {"pivot", "src"}  # with who answered
    prepared = load_from_disk(str(run / "prepared" / "dataset"))
    assert len(prepared) == 6 + n
    pooled = pooled_rows(cfg, prepared)
    assert pooled == set(range(6, 6 + n))
    assert all(b["messages"][-1]["content"] in prepared[i]["text"] for i, b in zip(sorted(pooled), best))
    target = json.loads((run / "targets" / "src" / "manifest.json").read_text())
    sft = json.loads((run / "targets" / "sft" / "manifest.json").read_text())
    assert target["train_sequences"] == 6 + n and sft["train_sequences"] == 6  # SFT on the gold alone
    fused = json.loads((run / "fuse" / "src" / "manifest.json").read_text())
    assert sum(fused["choices"].values()) == 6 + n  # the pool's answers have fused distributions too

    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    assert manifest["pool_answers"] == {"path": str(tmp_path / "run" / "pairs" / "sft.jsonl"), "rows": n}
    del manifest["pool_answers"]  # prepared data that does not say which rows are the pool's
    (run / "prepared" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FusechatError, match="fusechat prepare CONFIG --force"):
        pooled_rows(cfg, prepared)


def test_implicit_sft_trains_on_the_gold_and_the_pools_best_answers(tmp_path, tiny_models):
    cfg = load_run(pool_config(tmp_path, tiny_models, route="implicit",
                               implicit={"sample": {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 4,
                                                    "shard_size": 4, "dtype": "fp32", "device": "cpu"},
                                         "score": {"scorer": "checker"}, "pairs": {"include_pivot": True},
                                         "dpo": {"max_steps": 1, "global_batch_size": 2, "per_device_batch_size": 2}}))
    make_ready(cfg)
    for stage in ("sample", "score"):
        run_stage(stage, cfg)
    run_stage("train", cfg, source="implicit-sft")
    manifest = json.loads((tmp_path / "run" / "targets" / "implicit-sft" / "manifest.json").read_text())
    best = (tmp_path / "run" / "pairs" / "sft.jsonl").read_text().splitlines()
    assert manifest["train_sequences"] == 6 + len(best) and len(best) >= 3
    assert "gold" in manifest["data"] and "sft_set" in manifest["data"]
    card = (tmp_path / "run" / "targets" / "implicit-sft" / "README.md").read_text()
    assert "on the gold conversations and the best sampled answers" in card


# ---------------------------------------------------------------- two steps: the answers, then the distributions


def test_training_order_puts_what_others_start_from_first():
    from fusechat.config import RunConfig
    from fusechat.train import training_order

    names = ["a", "b", "sft", "multi", "implicit-sft", "implicit-dpo"]
    cfg = RunConfig.model_construct(train=RunConfig.model_fields["train"].default_factory())
    assert training_order(cfg, names) == [["a", "b", "sft", "multi", "implicit-sft"], ["implicit-dpo"]]
    cfg.train.start = "implicit-sft"
    assert training_order(cfg, names) == [["implicit-sft"], ["a", "b", "sft", "multi", "implicit-dpo"]]
    assert training_order(cfg, ["a"]) == [["a"]]


def test_the_sft_schedule_is_the_sft_models_own():
    from fusechat.config import TrainConfig
    from fusechat.train.targets import baseline_config

    cfg = load_config_dict({"train": TrainConfig(max_steps=300, learning_rate=5e-4,
                                                 sft={"epochs": 12, "max_steps": -1, "learning_rate": 1e-3})})
    sft = baseline_config(cfg, "sft").train
    assert (sft.lambda_, sft.epochs, sft.max_steps, sft.learning_rate) == (1.0, 12, -1, 1e-3)
    assert (cfg.train.max_steps, cfg.train.learning_rate) == (300, 5e-4)  # the targets keep theirs
    assert baseline_config(cfg, "sft").section_hash("train") != cfg.section_hash("train")


def load_config_dict(update: dict):
    from fusechat.config import RunConfig

    base = RunConfig(run_dir="r", pivot={"name": "p", "path": "p"}, sources=[{"name": "s", "path": "s"}],
                     data={"paths": ["d.jsonl"]})
    return base.model_copy(update=update)


def test_start_implicit_sft_needs_the_implicit_route(tmp_path, tiny_models):
    from fusechat.errors import ConfigError

    with pytest.raises(ConfigError, match="train.start implicit-sft needs the implicit route's implicit-sft target: "
                                          "set route: both"):
        load_run(pool_config(tmp_path, tiny_models, train={"start": "implicit-sft"}))


def test_targets_start_from_implicit_sft_and_merges_take_it_as_their_base(tmp_path, tiny_models):
    from safetensors.torch import load_file

    implicit = {"sample": {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 4, "shard_size": 4,
                           "dtype": "fp32", "device": "cpu"},
                "score": {"scorer": "checker"}, "pairs": {"include_pivot": True},
                "dpo": {"max_steps": 1, "global_batch_size": 2, "per_device_batch_size": 2}}
    # the targets barely move (a vanishing learning rate): they are their start
    train = {"max_steps": 1, "learning_rate": 1e-12, "global_batch_size": 2, "per_device_batch_size": 2,
             "report_to": ["none"], "start": "implicit-sft", "sft": {"max_steps": 3, "learning_rate": 1e-2}}
    sources = [{"name": "src", "path": str(tiny_models / "src")}, {"name": "src2", "path": str(tiny_models / "src")}]
    cfg = load_run(pool_config(tmp_path, tiny_models, route="both", implicit=implicit, train=train, sources=sources,
                               merge={"method": "linear"}))
    make_ready(cfg)
    for stage in ("sample", "score", "prepare", "represent", "align", "fuse", "train", "merge"):
        run_stage(stage, cfg)
    run = tmp_path / "run"
    start = load_file(str(run / "targets" / "implicit-sft" / "model.safetensors"))
    pivot = load_file(str(tiny_models / "pivot" / "model.safetensors"))
    for folder in ("targets/src", "targets/src2", "merged/linear"):
        weights = load_file(str(run / folder / "model.safetensors"))
        assert all(torch.allclose(weights[k], start[k], atol=1e-6) for k in start), folder
    assert not all(torch.allclose(start[k], pivot[k]) for k in pivot)  # implicit-sft moved from the pivot
    assert json.loads((run / "targets" / "implicit-sft" / "manifest.json").read_text())["steps"] == 3
    assert "starting from the implicit route's implicit-sft" in (run / "targets" / "src" / "README.md").read_text()
    assert json.loads((run / "merged" / "linear" / "manifest.json").read_text())["pivot"] == str(
        run / "targets" / "implicit-sft")
