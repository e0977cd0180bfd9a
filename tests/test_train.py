import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_config
from references import dense_fusion_loss
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from fusechat import align, fuse, prepare, represent
from fusechat.config import load_config
from fusechat.errors import FusechatError
from fusechat.train import run as train_run
from fusechat.train.loss import fusion_loss, teacher_with_temperature

# ------------------------------------------------------------------ the loss on tensors


def test_loss_by_hand():
    # One sequence of 3 tokens over a vocabulary of 3; uniform logits except position 1.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])  # tokens 1 and 2 are scored, at positions 0 and 1
    fused_ids = torch.tensor([[[1, 2], [0, 1], [0, 0]]])
    fused_probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False, False]])  # only position 0 in the fusion term
    parts = fusion_loss(logits, labels, fused_ids, fused_probs, mask, lambda_=0.9)
    # gold: position 0 predicts 1 with p = 1/3; position 1 predicts 0 with p = 2/4.
    gold = (math.log(3) + math.log(2)) / 2
    # fusion at position 0: -(0.5 log 1/3 + 0.5 log 1/3) = log 3.
    assert parts.gold.item() == pytest.approx(gold, rel=1e-6)
    assert parts.fusion.item() == pytest.approx(math.log(3), rel=1e-6)
    # per position: 0.9·gold + 0.1·fusion at position 0, gold alone at position 1 (not in the fusion term)
    assert parts.loss.item() == pytest.approx((0.9 * math.log(3) + 0.1 * math.log(3) + math.log(2)) / 2, rel=1e-6)
    full = fusion_loss(logits, labels, fused_ids, fused_probs, torch.tensor([[True, True, False]]), lambda_=0.9)
    # both positions fused (the paper's case): 0.9·mean gold + 0.1·mean fusion, fusion at 1 = -log(2/4)
    assert full.loss.item() == pytest.approx(0.9 * gold + 0.1 * (math.log(3) + math.log(2)) / 2, rel=1e-6)
    assert (parts.gold_tokens, parts.fusion_positions) == (2, 1)


def test_sparse_loss_equals_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    for lambda_ in (0.0, 0.5, 0.9, 1.0):
        logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
        labels = torch.randint(0, 11, (3, 7), generator=g)
        labels[torch.rand(3, 7, generator=g) < 0.3] = -100
        ids = torch.randint(0, 11, (3, 7, 4), generator=g)
        probs = torch.softmax(torch.randn(3, 7, 4, generator=g), dim=-1)
        mask = torch.rand(3, 7, generator=g) < 0.7
        sparse = fusion_loss(logits, labels, ids, probs, mask, lambda_).loss
        dense = dense_fusion_loss(logits, labels, ids, probs, mask, lambda_)
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
        g_sparse, = torch.autograd.grad(sparse, logits)
        g_dense, = torch.autograd.grad(dense, logits)
        torch.testing.assert_close(g_sparse, g_dense)


def test_kl_is_ce_minus_teacher_entropy_and_temperature():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, 1, 2, 3]])
    ids = torch.tensor([[[0, 1], [2, 3], [4, 5], [0, 1]]])
    probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]])
    mask = torch.tensor([[True, True, True, False]])
    ce = fusion_loss(logits, labels, ids, probs, mask, lambda_=0.0, kind="ce").fusion
    kl = fusion_loss(logits, labels, ids, probs, mask, lambda_=0.0, kind="kl").fusion
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25) + 2 * 0.5 * math.log(0.5)) / 3
    assert (ce - kl).item() == pytest.approx(entropy, rel=1e-5)
    sharp = teacher_with_temperature(torch.tensor([0.75, 0.25, 0.0]), 0.5)
    torch.testing.assert_close(sharp, torch.tensor([0.9, 0.1, 0.0]))


def test_lambda_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
        fusion_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), None, None, None, lambda_=1.5)


# ------------------------------------------------------------------ the stage

TRAIN = {"max_steps": 8, "global_batch_size": 2, "per_device_batch_size": 1, "learning_rate": 5e-3,
         "logging_steps": 2, "save_steps": 2, "warmup_ratio": 0.0, "report_to": ["none"]}


def fused_config(tmp_path, zoo, **sections):
    sections.setdefault("train", {})
    sections["train"] = {**TRAIN, **sections["train"]}
    path = write_config(tmp_path, zoo, pivot="llama", sources=("mistral",), **sections)
    cfg = load_config(path)
    prepare.run(cfg)
    represent.run(cfg)
    align.run(cfg)
    fuse.run(cfg)
    return path


def dataset_loss(cfg, model_dir):
    """Both loss terms over every training sequence at once."""
    from fusechat.prepare import load_prepared
    from fusechat.rundir import RunDir
    from fusechat.train.data import FusionCollator, FusionDataset, load_fused

    prepared = load_prepared(cfg)
    fused = load_fused(RunDir(cfg.run_dir).stage("fuse", "mistral"), cfg and RunDir(cfg.run_dir).root / "cache")
    batch = FusionCollator(0)(list(FusionDataset(prepared, list(range(len(prepared))), fused)))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return fusion_loss(logits, batch["labels"], batch["fused_ids"], batch["fused_probs"], batch["fusion_mask"], 0.9)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_training_lowers_both_loss_terms_and_saves_a_target(tmp_path, zoo):
    # The zoo's teachers are random models, so the gold and fused targets pull apart: λ = 0.5
    # gives both terms a say.
    cfg = load_config(fused_config(tmp_path, zoo, train={"max_steps": 30, "learning_rate": 1e-2, "logging_steps": 5,
                                                         "save_steps": 100, "lambda": 0.5}))
    out = train_run(cfg)[0]
    assert out.name == "mistral"
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("loss_gold" in h and "loss_fusion" in h for h in manifest["log_history"])
    before, after = dataset_loss(cfg, cfg.pivot.path), dataset_loss(cfg, out)
    assert after.gold < before.gold
    assert after.fusion < before.fusion
    assert manifest["steps"] == 30 and manifest["complete"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    card = (out / "README.md").read_text()
    assert "mistral" in card and "λ = 0.5" in card
    assert "GPT4 Correct Assistant:" in (out / "chat_template.jinja").read_text()
    assert not (out.parent / ".mistral.work").exists()  # checkpoints removed once the target is saved


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_reaches_the_same_weights(tmp_path, zoo, monkeypatch, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    expected = weights(train_run(load_config(fused_config(clean, zoo)))[0])

    from fusechat.train import trainer as trainer_module

    original_init = trainer_module.FusionTrainer.__init__

    def init_with_stop(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StopAt(5))  # after the checkpoint at step 4

    cfg = load_config(fused_config(tmp_path, zoo))
    monkeypatch.setattr(trainer_module.FusionTrainer, "__init__", init_with_stop)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg)
    work = tmp_path / "run" / "targets" / ".mistral.work" / "checkpoints"
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    # A kill during the save of checkpoint-6: its weights are written, its trainer state is torn.
    torn = work / "checkpoint-6"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((work / "checkpoint-4" / "model.safetensors").read_bytes())
    (torn / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    monkeypatch.setattr(trainer_module.FusionTrainer, "__init__", original_init)
    out = train_run(cfg)[0]
    said = capsys.readouterr().err
    assert "skipping checkpoint-6 (not completely written)" in " ".join(said.split())
    assert "resuming from" in said and "checkpoint-4" in said
    resumed = weights(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)  # the stated tolerance
    # The saved loss covers the steps before the resume too.
    expected_loss = json.loads((clean / "run" / "targets" / "mistral" / "manifest.json").read_text())["train_loss"]
    assert json.loads((out / "manifest.json").read_text())["train_loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_a_rerun_with_other_settings_starts_afresh_instead_of_resuming(tmp_path, zoo, monkeypatch, capsys):
    other = {"learning_rate": 1e-2, "max_steps": 6}
    clean = tmp_path / "clean"
    clean.mkdir()
    expected = weights(train_run(load_config(fused_config(clean, zoo, train=other)))[0])

    from fusechat.train import trainer as trainer_module

    original_init = trainer_module.FusionTrainer.__init__

    def init_with_stop(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StopAt(5))

    path = fused_config(tmp_path, zoo)  # learning rate 5e-3, 8 steps
    monkeypatch.setattr(trainer_module.FusionTrainer, "__init__", init_with_stop)
    with pytest.raises(KeyboardInterrupt):
        train_run(load_config(path))
    monkeypatch.setattr(trainer_module.FusionTrainer, "__init__", original_init)
    capsys.readouterr()
    out = train_run(load_config(path, overrides=["train.learning_rate=1e-2", "train.max_steps=6"]))[0]
    said = " ".join(capsys.readouterr().err.split())
    assert "made with other inputs or settings" in said and "starting afresh" in said
    assert "resuming from" not in said
    manifest = json.loads((out / "manifest.json").read_text())
    clean_manifest = json.loads((clean / "run" / "targets" / "mistral" / "manifest.json").read_text())
    rates = lambda m: [h["learning_rate"] for h in m["log_history"] if "learning_rate" in h]  # noqa: E731
    assert rates(manifest) == pytest.approx(rates(clean_manifest))
    for name, tensor in expected.items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-5, atol=1e-6)


def test_sft_and_multi_baselines_from_config(tmp_path, zoo):
    sft = load_config(fused_config(tmp_path, zoo), overrides=["train.lambda=1.0"])
    out = train_run(sft)[0]
    assert out.name == "sft"
    assert json.loads((out / "manifest.json").read_text())["fused"] is None
    multi = load_config(tmp_path / "run.yaml", overrides=["fuse.method=multi"])
    fuse.run(multi)
    assert [p.name for p in train_run(multi)] == ["multi"]


def test_lora_is_merged_into_full_weights(tmp_path, zoo):
    cfg = load_config(fused_config(tmp_path, zoo, train={"lora": {"enabled": True, "r": 4, "alpha": 8}}))
    out = train_run(cfg)[0]
    assert not (out / "adapter_config.json").exists()
    trained, pivot = weights(out), load_file(str(cfg.pivot.path) + "/model.safetensors")
    assert set(trained) == set(pivot)
    moved = [n for n in pivot if not torch.equal(trained[n], pivot[n])]
    assert any("q_proj" in n for n in moved)


def test_fused_targets_of_another_pivot_are_refused(tmp_path, zoo):
    path = fused_config(tmp_path, zoo)
    cfg = load_config(path, overrides=[f"pivot.path={zoo['qwen2']}"])
    with pytest.raises(FusechatError, match="made for another pivot"):
        train_run(cfg)


def test_empty_training_set_is_refused(tmp_path, zoo):
    from conftest import CONVERSATIONS, write_jsonl

    cfg = load_config(fused_config(tmp_path, zoo))
    write_jsonl(tmp_path / "one.jsonl", CONVERSATIONS[:1])
    one = load_config(tmp_path / "run.yaml", overrides=[f"data.paths=[{tmp_path / 'one.jsonl'}]",
                                                         f"run_dir={tmp_path / 'one'}", "train.eval_fraction=0.5",
                                                         "train.lambda=1.0"])
    prepare.run(one)
    with pytest.raises(FusechatError, match="no training sequence left"):
        train_run(one)
    assert cfg.train.lambda_ == 0.9


def test_two_process_ddp_training(tmp_path, zoo):
    path = fused_config(tmp_path, zoo, train={"max_steps": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "fusechat", "train", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run" / "targets" / "mistral"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["complete"] and manifest["num_processes"] == 2
    assert any("loss_fusion" in h for h in manifest["log_history"])
    trained = weights(out)
    assert all(np.isfinite(t.float().numpy()).all() for t in trained.values())


def test_lambda_decay_and_held_out_evaluation(tmp_path, zoo):
    cfg = load_config(fused_config(tmp_path, zoo, train={"lambda": 0.9, "lambda_end": 0.5, "eval_fraction": 0.4,
                                                         "fusion_loss": "kl", "temperature": 2.0}))
    out = train_run(cfg)[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["train_sequences"], manifest["eval_sequences"]) == (3, 2)
    history = manifest["log_history"]
    lambdas = [h["lambda"] for h in history if "lambda" in h and "eval_loss" not in h]
    # λ is 0.9 at optimizer step 0 (two micro-batches) and 0.9 - 0.4 / 8 = 0.85 at step 1, whose
    # epoch has one sequence left (3 training sequences, 2 per step): logged as the mean of the three.
    assert lambdas[0] == pytest.approx((0.9 + 0.9 + 0.85) / 3, abs=1e-6)
    assert lambdas == sorted(lambdas, reverse=True) and lambdas[-1] < 0.6
    evals = [h for h in history if "eval_loss" in h]
    assert evals and all("eval_loss_gold" in h and "eval_loss_fusion" in h for h in evals)


def test_baselines_train_beside_the_targets_and_leave_their_fingerprints_alone(tmp_path, zoo):
    from fusechat.config import load_config
    from fusechat.train import targets
    from fusechat.train.targets import baseline_config

    config = write_config(tmp_path, zoo, train={"max_steps": 1, "report_to": ["none"], "baselines": ["sft", "multi"]})
    cfg = load_config(config)
    assert targets(cfg) == ["mistral", "sft", "multi"]
    assert baseline_config(cfg, "sft").train.lambda_ == 1.0 and baseline_config(cfg, "multi").fuse.method == "multi"
    plain = load_config(config, overrides=["train.baselines=[]"])
    assert plain.section_hash("train") == cfg.section_hash("train")
    assert load_config(config, overrides=["train.lambda=0.5"]).section_hash("train") != cfg.section_hash("train")


def test_chunked_and_plain_loss_train_to_the_same_weights(tmp_path, zoo):
    path = fused_config(tmp_path, zoo, train={"eval_fraction": 0.4})
    assert load_config(path).train.chunked_loss == "auto"  # by default only for big vocabularies, not this one
    cfg = load_config(path, overrides=["train.chunked_loss=true"])
    chunked_out = train_run(cfg)[0]
    chunked = weights(chunked_out)
    chunked_history = json.loads((chunked_out / "manifest.json").read_text())["log_history"]
    plain_cfg = load_config(tmp_path / "run.yaml", overrides=["train.chunked_loss=false"])
    assert plain_cfg.section_hash("train") == cfg.section_hash("train")  # a switch of the computation only
    plain_out = train_run(plain_cfg, force=True)[0]
    plain_history = json.loads((plain_out / "manifest.json").read_text())["log_history"]
    for key in ("loss", "loss_gold", "loss_fusion", "eval_loss"):
        got = [h[key] for h in chunked_history if key in h]
        expected = [h[key] for h in plain_history if key in h]
        assert got and got == pytest.approx(expected, rel=1e-4), key
    # Adam moves a weight by about the learning rate (5e-3) per step whatever the size of its gradient, so a
    # rounding difference in a near-zero gradient can show: allow 2 % of one step.
    for name, tensor in weights(plain_out).items():
        torch.testing.assert_close(chunked[name], tensor, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_workers_train_targets_side_by_side_as_one_thread_would(tmp_path, zoo, monkeypatch):
    # Two targets (the source's and SFT) in two worker processes, one thread each: each the same weights as
    # that target trained here on one thread; their logs removed once they are saved.
    path = fused_config(tmp_path, zoo, train={"baselines": ["sft"]})
    side = load_config(path, overrides=["train.workers=2"])
    outs = train_run(side)
    assert [p.name for p in outs] == ["mistral", "sft"]
    assert not list(outs[0].parent.glob(".*.log"))
    one = load_config(path, overrides=[f"run_dir={tmp_path / 'one'}"])
    import shutil

    for stage in ("prepared", "fuse"):
        shutil.copytree(tmp_path / "run" / stage, tmp_path / "one" / stage)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train_run(one)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs, alone):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((outs[1] / "manifest.json").read_text())["fingerprint"] == \
        json.loads((alone[1] / "manifest.json").read_text())["fingerprint"]  # workers are not a setting of a target


def test_a_failing_worker_names_its_target_and_its_log(tmp_path, zoo):
    path = fused_config(tmp_path, zoo, train={"baselines": ["sft"]})
    side = load_config(path, overrides=["train.workers=2", "train.per_device_batch_size=3"])  # 2 is not a multiple
    with pytest.raises(FusechatError, match=r"train mistral: .*not a multiple of per_device_batch_size 3.*"
                                            r"its output: .*\.mistral\.log"):
        train_run(side)
