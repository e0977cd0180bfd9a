"""The GOLD baseline: TRL's GOLDTrainer distils a byte-level source into the pivot on the run's data and
schedule, into targets/gold-<source>; sources it cannot align are refused; two GOLD targets are merged."""

import json

import pytest
import torch
import yaml
from conftest import write_config
from safetensors.torch import load_file

from fusechat import prepare
from fusechat.config import load_config
from fusechat.errors import ConfigError, FusechatError
from fusechat.evaluate.rows import model_rows, row_notes
from fusechat.train import targets
from fusechat.train.gold import SETTINGS, train_gold

TRAIN = {"max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 1, "learning_rate": 5e-3,
         "logging_steps": 1, "warmup_ratio": 0.0, "report_to": ["none"], "baselines": ["gold"]}


def gold_config(tmp_path, zoo, sources=("qwen2", "mistral"), **train):
    path = write_config(tmp_path, zoo, pivot="llama", sources=sources, train={**TRAIN, **train})
    cfg = load_config(path)
    prepare.run(cfg)
    return cfg


def test_gold_distils_a_byte_level_source_into_the_pivot(tmp_path, zoo):
    cfg = gold_config(tmp_path, zoo, gold_sources=["qwen2"])
    assert targets(cfg) == ["qwen2", "mistral", "gold-qwen2"]
    out = train_gold(cfg, "gold-qwen2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["steps"] == 2 and manifest["gold"] == SETTINGS
    assert manifest["train_sequences"] == 5
    losses = [h["loss"] for h in manifest["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(float(v))) for v in losses)
    pivot = load_file(str(zoo["llama"] / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(pivot[k], trained[k]) for k in pivot)  # it learnt something
    assert "TRL's GOLD distillation" in (out / "README.md").read_text()
    # complete: skipped, byte for byte
    before = (out / "model.safetensors").read_bytes()
    train_gold(cfg, "gold-qwen2")
    assert (out / "model.safetensors").read_bytes() == before
    rows = [r.name for r in model_rows(cfg)]
    assert "gold-qwen2" in rows and "target-gold-qwen2" not in rows
    assert "TRL's GOLD: the pivot distilled from qwen2" in row_notes(cfg, rows)["gold-qwen2"]


def test_gold_refuses_a_tokenizer_it_cannot_align(tmp_path, zoo):
    cfg = gold_config(tmp_path, zoo, gold_sources=["mistral"])
    with pytest.raises(FusechatError, match="GOLD aligns byte-level BPE tokenizers only, and source 'mistral'"):
        train_gold(cfg, "gold-mistral")
    assert not (tmp_path / "run" / "targets" / "gold-mistral").exists()


def test_gold_sources_must_be_sources_and_go_with_the_baseline(tmp_path, zoo):
    path = write_config(tmp_path, zoo, pivot="llama", sources=("qwen2",), train={"gold_sources": ["qwen3"],
                                                                                  "baselines": ["gold"]})
    with pytest.raises(ConfigError, match=r"train.gold_sources\[0\] 'qwen3' is not a source of this run"):
        load_config(path)
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {"gold_sources": ["qwen2"]}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="train.gold_sources goes with the gold baseline"):
        load_config(path)
    raw["sources"][0]["name"] = "gold"
    raw["train"] = {}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="'gold' is reserved"):
        load_config(path)


def test_two_gold_targets_are_merged_with_the_runs_method(tmp_path, zoo):
    from fusechat.merge.stage import Inputs, merge_one

    raw_sources = ("qwen2",)
    path = write_config(tmp_path, zoo, pivot="llama", sources=raw_sources, train=TRAIN)
    raw = yaml.safe_load(path.read_text())
    raw["sources"].append({"name": "qwen2b", "path": raw["sources"][0]["path"]})  # a second byte-level source
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    prepare.run(cfg)
    assert cfg.gold_targets() == ["gold-qwen2", "gold-qwen2b"]
    for name in cfg.gold_targets():
        train_gold(cfg, name)
    out = merge_one(cfg, Inputs(cfg, cfg.gold_targets()), cfg.merge.method, folder="gold")
    manifest = json.loads((out / "manifest.json").read_text())
    assert out.name == "gold" and manifest["targets"] == ["gold-qwen2", "gold-qwen2b"]
    assert manifest["method"] == cfg.merge.method
    assert "gold" in [r.name for r in model_rows(cfg)]
