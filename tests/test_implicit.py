"""Implicit fusion: sampling (resumable, reproducible), scoring, pair rules, and their errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from fusechat.config import PairsConfig
from fusechat.errors import ConfigError, DataError, FusechatError
from fusechat.implicit.pairs import Candidate, build_pairs, choose_pair, choose_sft, choose_wrpo
from fusechat.implicit.prompts import Prompt
from fusechat.implicit.sample import read_samples
from fusechat.implicit.score import read_jsonl, read_scores
from fusechat.pipeline import load_run, make_ready, run_stage

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dirs):
    """Two tiny random Llamas on the byte-level tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    from fusechat.zoo.architectures import build_model

    root = tmp_path_factory.mktemp("implicit-models")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_bpe"]))
    for name, seed in (("pivot", 1), ("src", 2)):
        build_model("llama", tokenizer, out_dir=root / name, seed=seed, hidden=32, layers=1)
    return root


def synthetic_data(path: Path, n: int = 6) -> Path:
    from fusechat.synthetic.skills import conversations

    records = conversations("reverse", n // 2, seed=1) + conversations("add", n - n // 2, seed=1)
    return write_jsonl(path, records)


def implicit_config(tmp_path: Path, models: Path, data: Path, **implicit) -> Path:
    sample = {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 2, "shard_size": 2,
              "dtype": "fp32", "device": "cpu", **implicit.pop("sample", {})}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "route": "implicit",
        "pivot": {"name": "pivot", "path": str(models / "pivot")},
        "sources": [{"name": "src", "path": str(models / "src")}],
        "data": {"paths": [str(data)]},
        "implicit": {"sample": sample, **implicit},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------- pair rules on hand-made scores

ORDER = {"a": 0, "b": 1, "pivot": 2}


def cand(model, sample, score, response=None):
    return Candidate(model, sample, response or f"{model}{sample}", score)


def test_sft_takes_the_best_answer_ties_to_the_earlier_model_then_sample():
    cands = [cand("b", 0, 0.9), cand("a", 1, 0.9), cand("a", 0, 0.5)]
    top, why = choose_sft(cands, PairsConfig(), ORDER)
    assert (top.model, top.sample, why) == ("a", 1, "")
    top, why = choose_sft(cands, PairsConfig(sft_min_score=0.95), ORDER)
    assert top is None and why == "below_sft_min_score"


def test_same_model_pairs_come_from_the_model_with_the_best_answer_and_a_margin():
    # a: 0.9 / 0.1 (gap 0.8); b: 1.0 / 1.0 (no gap), so b's best cannot pair with its own answers
    cands = [cand("a", 0, 0.9), cand("a", 1, 0.1), cand("b", 0, 1.0), cand("b", 1, 1.0)]
    (chosen, rejected), _ = choose_pair(cands, PairsConfig(), ORDER)
    assert (chosen.model, chosen.sample, rejected.model, rejected.sample) == ("a", 0, "a", 1)
    # any: the overall best against the overall worst, across models
    (chosen, rejected), _ = choose_pair(cands, PairsConfig(pair_from="any"), ORDER)
    assert (chosen.model, rejected.model) == ("b", "a")
    # a margin larger than every gap leaves no pair
    assert choose_pair(cands, PairsConfig(min_margin=0.8), ORDER) == (None, "no_margin")
    assert choose_pair(cands, PairsConfig(min_margin=0.79), ORDER)[0] is not None


def test_pairs_skip_equal_scores_single_answers_and_identical_text():
    assert choose_pair([cand("a", 0, 1.0)], PairsConfig(), ORDER) == (None, "fewer_than_two_answers")
    assert choose_pair([cand("a", 0, 1.0), cand("a", 1, 1.0)], PairsConfig(), ORDER) == (None, "no_margin")
    same = [cand("a", 0, 1.0, "x"), cand("a", 1, 0.0, "x")]
    assert choose_pair(same, PairsConfig(), ORDER) == (None, "identical_answers")


def test_wrpo_triples_take_the_targets_own_best_and_worst():
    source = [cand("a", 0, 1.0), cand("b", 0, 0.5)]
    target = [cand("pivot", 0, 0.4), cand("pivot", 1, 0.0), cand("pivot", 2, 0.2)]
    (chosen, own, rejected), _ = choose_wrpo(source, target, PairsConfig(), ORDER)
    assert (chosen.model, own.sample, rejected.sample) == ("a", 0, 1)
    assert choose_wrpo(source, target, PairsConfig(min_margin=1.0), ORDER) == (None, "no_margin")
    assert choose_wrpo(source, target[:1], PairsConfig(), ORDER) == (None, "fewer_than_two_target_answers")


def test_build_pairs_report_counts_and_leaves_unscored_answers_out():
    prompts = [Prompt(0, "p0", "f:1", [{"role": "user", "content": "q0"}]),
               Prompt(1, "p1", "f:2", [{"role": "user", "content": "q1"}])]
    answers = {0: [cand("a", 0, 1.0), cand("a", 1, 0.0), cand("b", 0, math.nan)],
               1: [cand("a", 0, 0.0), cand("b", 0, 0.0), cand("pivot", 0, 1.0)]}
    sets = build_pairs(prompts, answers, PairsConfig(), ["a", "b", "pivot"], "pivot", wrpo=False)
    assert [r["id"] for r in sets.sft] == ["p0", "p1"]
    assert sets.sft[0]["messages"][-1] == {"role": "assistant", "content": "a0"}
    assert sets.sft[1]["model"] == "a"  # the pivot's better answer is no candidate without include_pivot
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in sets.pairs] == [
        ("p0", "a0", "a1")]
    report = sets.report
    assert report["unscored"] == 1 and report["pairs"] == 1 and report["pairs_skipped"] == {"no_margin": 1}
    assert report["per_model"]["a"] == {"answers": 3, "scored": 3, "mean_score": round(1 / 3, 4), "sft": 2,
                                        "chosen": 1, "rejected": 1}
    with_pivot = build_pairs(prompts, answers, PairsConfig(include_pivot=True), ["a", "b", "pivot"], "pivot", False)
    assert with_pivot.sft[1]["model"] == "pivot"


def test_synthetic_checker_gives_valid_answers_1_and_near_misses_partial_credit():
    from fusechat.synthetic.checker import skill_checker

    prompt = Prompt(0, "r", "f:1", [{"role": "user", "content": "Reverse the word lomi."}],
                    {"skill": "reverse", "key": "lomi"})
    assert skill_checker(prompt, " imol\n") == 1.0
    assert 0.5 < skill_checker(prompt, "imo") < 1.0
    assert skill_checker(prompt, "imo") > skill_checker(prompt, "xyzw")
    described = Prompt(1, "d", "f:2", [], {"skill": "describe", "key": "Tamaro"})
    from fusechat.synthetic.skills import ALL_SKILLS

    answer, _ = ALL_SKILLS["describe"].distribution("Tamaro")[-1]
    assert skill_checker(described, answer) == 1.0
    with pytest.raises(ValueError, match="unknown skill 'juggle'"):
        skill_checker(Prompt(2, "j", "f:3", [], {"skill": "juggle", "key": "x"}), "x")


def test_judge_ratings_are_read_from_the_reply_and_missing_ones_are_nan():
    from fusechat.implicit.scorers import judge_messages, parse_rating

    assert parse_rating("Clear and right. Rating: [[8]]") == 8.0
    assert parse_rating("[[3]] at first, then Rating: [[ 7.5 ]]") == 7.5
    assert math.isnan(parse_rating("no rating here")) and math.isnan(parse_rating(RuntimeError("timeout")))
    prompt = Prompt(0, "p", "f:1", [{"role": "user", "content": "Reverse the word lomi."}])
    system, user = judge_messages(prompt, "imol")
    assert system["role"] == "system" and "user: Reverse the word lomi." in user["content"]
    assert "[Answer]\nimol" in user["content"] and "Rating: [[5]]" in user["content"]


# ---------------------------------------------------------------- the stages


def test_sample_and_score_write_answers_scores_and_pairs(tmp_path, tiny_models):
    data = synthetic_data(tmp_path / "train.jsonl", 5)
    cfg = load_run(implicit_config(tmp_path, tiny_models, data))
    make_ready(cfg)
    run_stage("sample", cfg)
    run_stage("score", cfg)
    run = Path(cfg.run_dir)
    samples = read_samples(run / "samples" / "src")
    assert [(r["seq"], r["sample"]) for r in samples] == [(i, k) for i in range(5) for k in range(2)]
    manifest = json.loads((run / "samples" / "src" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["samples"] == 10
    assert not (run / "samples" / ".src.work").exists()
    scores = read_scores(run / "scores")
    assert len(scores) == 10 and all(0 <= r["score"] <= 1 for r in scores)
    report = json.loads((run / "pairs" / "report.json").read_text())
    assert report["prompts"] == 5 and report["answers"] == 10
    assert report["sft"] == len(read_jsonl(run / "pairs" / "sft.jsonl"))
    assert (run / "pairs" / "report.md").read_text().startswith("# Implicit fusion")
    # complete stages skip themselves
    run_stage("sample", cfg)
    assert json.loads((run / "samples" / "src" / "manifest.json").read_text())["started_at"] == manifest["started_at"]


KILLABLE = """
import importlib, sys, time
from fusechat.pipeline import load_run, make_ready, run_stage

module, name = importlib.import_module(sys.argv[2]), sys.argv[3]
write = getattr(module, name)
def write_then_wait(*args, **kwargs):  # time to be killed between two shards
    size = write(*args, **kwargs)
    time.sleep(30)
    return size
setattr(module, name, write_then_wait)
cfg = load_run(sys.argv[1])
make_ready(cfg)
run_stage(sys.argv[4], cfg)
"""


def shard_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(folder.glob("shard-*.parquet"))
    assert files
    return {f.name: f.read_bytes() for f in files}


def kill_after_first_shard(config: Path, stage: str, module: str, writer: str, work: Path) -> None:
    """Run ``stage`` in a subprocess and SIGKILL it once its first shard is in ``work``."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(config), module, writer, stage], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(work.glob("shard-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(work.glob("shard-*.parquet"))) == 1


def test_sample_resumes_after_kill_9_with_the_same_answers(tmp_path, tiny_models):
    data = synthetic_data(tmp_path / "train.jsonl", 6)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir(), clean_dir.mkdir()
    killed_cfg = implicit_config(killed_dir, tiny_models, data, sample={"models": ["src"]})
    kill_after_first_shard(killed_cfg, "sample", "fusechat.implicit.sample", "write_samples",
                           killed_dir / "run" / "samples" / ".src.work")
    assert not (killed_dir / "run" / "samples" / "src" / "manifest.json").exists()

    resumed = load_run(killed_cfg)
    run_stage("sample", resumed)
    clean = load_run(implicit_config(clean_dir, tiny_models, data, sample={"models": ["src"]}))
    run_stage("sample", clean)
    killed_rows = read_samples(killed_dir / "run" / "samples" / "src")
    assert len(killed_rows) == 12
    assert killed_rows == read_samples(clean_dir / "run" / "samples" / "src")
    # byte for byte: a shard holds its rows and counts, no times
    assert shard_bytes(killed_dir / "run" / "samples" / "src") == shard_bytes(clean_dir / "run" / "samples" / "src")
    assert any(r["response"] for r in killed_rows)


def test_score_resumes_after_kill_9_with_the_same_scores_and_pairs(tmp_path, tiny_models):
    data = synthetic_data(tmp_path / "train.jsonl", 6)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir(), clean_dir.mkdir()
    killed_cfg = implicit_config(killed_dir, tiny_models, data, sample={"models": ["src"]})
    run_stage("sample", load_run(killed_cfg))
    kill_after_first_shard(killed_cfg, "score", "fusechat.implicit.score", "write_scores",
                           killed_dir / "run" / ".scores.work")  # one of three shards scored
    assert not (killed_dir / "run" / "scores" / "manifest.json").exists()

    run_stage("score", load_run(killed_cfg))
    clean = load_run(implicit_config(clean_dir, tiny_models, data, sample={"models": ["src"]}))
    run_stage("sample", clean)
    run_stage("score", clean)
    for name in ("sft.jsonl", "pairs.jsonl", "report.json"):
        assert (killed_dir / "run" / "pairs" / name).read_bytes() == (clean_dir / "run" / "pairs" / name).read_bytes()
    from fusechat.implicit.score import read_scores
    assert read_scores(killed_dir / "run" / "scores") == read_scores(clean_dir / "run" / "scores")
    assert shard_bytes(killed_dir / "run" / "scores") == shard_bytes(clean_dir / "run" / "scores")
    assert json.loads((killed_dir / "run" / "scores" / "manifest.json").read_text())["elapsed_s"] > 0


# ---------------------------------------------------------------- bad input


def sampled(config: Path):
    """The run of ``config``, made ready and sampled."""
    cfg = load_run(config)
    make_ready(cfg)
    run_stage("sample", cfg)
    return cfg


def test_checker_names_the_record_without_a_skill(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "plain.jsonl", [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    cfg = sampled(implicit_config(tmp_path, tiny_models, data, sample={"models": ["src"]}))
    with pytest.raises(DataError, match=r"plain.jsonl:1 \(record 'a'\): the checker scorer needs the record's "
                                        r"`skill` field"):
        run_stage("score", cfg)


def test_score_needs_the_samples_first(tmp_path, tiny_models):
    cfg = load_run(implicit_config(tmp_path, tiny_models, synthetic_data(tmp_path / "t.jsonl", 2)))
    with pytest.raises(FusechatError, match=r"no complete sampled answers of src; run `fusechat sample CONFIG`"):
        run_stage("score", cfg)


def test_reward_model_must_be_a_sequence_classifier(tmp_path, tiny_models):
    from fusechat.config import ScoreConfig
    from fusechat.implicit.scorers import make_scorer

    data = synthetic_data(tmp_path / "t.jsonl", 2)
    path = implicit_config(tmp_path, tiny_models, data, sample={"models": ["src"]},
                           score={"scorer": "reward_model", "reward_model": str(tiny_models / "pivot")})
    with pytest.raises(ConfigError, match=r"implicit.score.reward_model: .*pivot is not a sequence classifier "
                                          r"\(config.json architectures: \['LlamaForCausalLM'\]\)"):
        load_run(path)
    settings = ScoreConfig(scorer="reward_model", reward_model=str(tiny_models / "pivot"))
    with pytest.raises(FusechatError, match=r"implicit.score.reward_model: .*not a sequence classifier"):
        make_scorer(settings, None)
    with pytest.raises(FusechatError, match=r"reward model folder not found: .*nowhere"):
        make_scorer(ScoreConfig(scorer="reward_model", reward_model=str(tmp_path / "nowhere")), None)


def test_a_one_label_classifier_scores_as_reward_model(tmp_path, tiny_models):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models / "pivot"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path / "rm"))
    tokenizer.save_pretrained(str(tmp_path / "rm"))
    data = write_jsonl(tmp_path / "plain.jsonl", [
        {"id": f"r{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
        for i in range(3)])
    cfg = load_run(implicit_config(tmp_path, tiny_models, data, sample={"models": ["src"]},
                                   score={"scorer": "reward_model", "reward_model": str(tmp_path / "rm"),
                                          "device": "cpu", "batch_size": 4}))
    make_ready(cfg)
    run_stage("sample", cfg)
    run_stage("score", cfg)
    scores = [r["score"] for r in read_scores(Path(cfg.run_dir) / "scores")]
    assert len(scores) == 6 and all(math.isfinite(s) for s in scores) and len(set(scores)) > 1


def test_wrpo_needs_the_pivots_answers(tmp_path, tiny_models):
    data = synthetic_data(tmp_path / "t.jsonl", 2)
    cfg = sampled(implicit_config(tmp_path, tiny_models, data, sample={"models": ["src"]}, dpo={"loss": "wrpo"}))
    with pytest.raises(FusechatError, match=r"wrpo, which needs the pivot's own answers: add 'pivot' to "
                                            r"implicit.sample.models"):
        run_stage("score", cfg)


def test_config_names_unknown_answering_models_and_missing_scorer_settings(tmp_path, tiny_models):
    data = synthetic_data(tmp_path / "t.jsonl", 2)
    with pytest.raises(ConfigError, match=r"implicit.sample.models\[1\]: no model named 'nope'"):
        load_run(implicit_config(tmp_path, tiny_models, data, sample={"models": ["src", "nope"]}))
    with pytest.raises(ConfigError, match=r"scorer reward_model needs implicit.score.reward_model"):
        load_run(implicit_config(tmp_path, tiny_models, data, score={"scorer": "reward_model"}))
    with pytest.raises(ConfigError, match=r"route: Input should be 'explicit', 'implicit' or 'both'"):
        path = implicit_config(tmp_path, tiny_models, data)
        raw = yaml.safe_load(path.read_text())
        raw["route"] = "sideways"
        path.write_text(yaml.safe_dump(raw))
        load_run(path)


def test_the_route_decides_the_targets_and_stages(tmp_path, tiny_models):
    from fusechat.pipeline import route_stages
    from fusechat.train import targets

    data = synthetic_data(tmp_path / "t.jsonl", 2)
    cfg = load_run(implicit_config(tmp_path, tiny_models, data))
    assert targets(cfg) == ["implicit-sft", "implicit-dpo"]
    assert route_stages(cfg) == ["sample", "score", "train", "eval"]
    both = cfg.model_copy(update={"route": "both"})
    assert targets(both) == ["src", "implicit-sft", "implicit-dpo"]
    assert route_stages(both) == ["sample", "score", "prepare", "represent", "align", "fuse", "train", "merge",
                                  "eval"]
    assert "sample" not in route_stages(cfg.model_copy(update={"route": "explicit"}))


def test_implicit_dpo_needs_implicit_sft_first(tmp_path, tiny_models):
    from fusechat.train import run as train_run

    cfg = load_run(implicit_config(tmp_path, tiny_models, synthetic_data(tmp_path / "t.jsonl", 2)))
    with pytest.raises(FusechatError, match="no complete implicit-sft target; run `fusechat train CONFIG "
                                            "--source implicit-sft` first"):
        train_run(cfg, source="implicit-dpo")


def test_a_prompt_longer_than_the_models_context_is_named_before_any_answer(tmp_path, tiny_models):
    long_text = " ".join(str(i) for i in range(1500))  # > 2,048 tokens of the byte-level tokenizer
    data = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "short", "skill": "reverse", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "ih"}]},
        {"id": "long", "skill": "reverse", "conversations": [{"from": "human", "value": long_text},
                                                             {"from": "gpt", "value": "x"}]}])
    cfg = load_run(implicit_config(tmp_path, tiny_models, data, sample={"models": ["src"]}))
    make_ready(cfg)
    with pytest.raises(DataError, match=r"1 prompt\(s\) too long for src: its context holds 2048 tokens, 6 of them "
                                        r"kept for the answer .* a prompt may take 2042:\n  .*t.jsonl:2 "
                                        r"\(record 'long'\): \d{4} tokens\n"):
        run_stage("sample", cfg)
    assert not list((Path(cfg.run_dir) / "samples").glob("*/shard-*.parquet"))


def test_empty_answers_get_no_score_and_a_model_that_only_stops_is_an_error(tmp_path):
    from fusechat.implicit.sample import check_not_all_empty, write_samples
    from fusechat.implicit.score import score_rows
    from fusechat.implicit.scorers import CheckerScorer
    from fusechat.synthetic.checker import skill_checker

    prompts = [Prompt(i, f"r{i}", f"t.jsonl:{i + 1}", [{"role": "user", "content": "Reverse: abc"}],
                      {"skill": "reverse", "key": "abc"}) for i in range(3)]
    values = score_rows(CheckerScorer(skill_checker), prompts, ["", "cba", ""])
    assert math.isnan(values[0]) and math.isnan(values[2]) and values[1] == 1.0

    # an empty answer is never chosen: the other answer goes to the SFT set alone
    sets = build_pairs(prompts[:1], {0: [Candidate("a", 0, "", math.nan), Candidate("a", 1, "bca", 0.3)]},
                       PairsConfig(), ["a"], "pivot", wrpo=False)
    assert [r["messages"][-1]["content"] for r in sets.sft] == ["bca"] and not sets.pairs

    row = {"seq": 0, "id": "r0", "sample": 0, "new_tokens": 0, "finished": True}
    write_samples(tmp_path / "shard-00000.parquet", [{**row, "response": ""}], {"samples": 1, "empty": 1})
    write_samples(tmp_path / "shard-00001.parquet", [{**row, "response": ""}], {"samples": 1, "empty": 1})
    with pytest.raises(FusechatError, match=r"sample src: all 2 answers are empty .* Check its chat template"):
        check_not_all_empty("src", tmp_path)
    write_samples(tmp_path / "shard-00001.parquet", [{**row, "response": "x"}], {"samples": 1, "empty": 0})
    check_not_all_empty("src", tmp_path)
