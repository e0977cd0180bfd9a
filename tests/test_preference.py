"""DPO (TRL's DPOTrainer) and WRPO (fusechat's subclass) losses against a hand computation on a tiny batch."""

import copy
import math

import pytest
import torch
from datasets import Dataset

from fusechat.implicit.wrpo import WRPOTrainer, sequence_logps, wrpo_alpha, wrpo_loss

PAIRS = [
    {"prompt": [{"role": "user", "content": "hello there"}],
     "chosen": [{"role": "assistant", "content": "I am fine"}],
     "rejected": [{"role": "assistant", "content": "weather nice today, thanks"}],
     "target_chosen": [{"role": "assistant", "content": "hello"}]},
    {"prompt": [{"role": "user", "content": "Reverse the word planet."}],
     "chosen": [{"role": "assistant", "content": "tenalp"}],
     "rejected": [{"role": "assistant", "content": "planet"}],
     "target_chosen": [{"role": "assistant", "content": "tenal"}]},
]


@pytest.fixture(scope="module")
def models(tokenizer_dirs):
    from transformers import AutoTokenizer

    from fusechat.zoo.architectures import build_model

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_bpe"]))
    return tokenizer, build_model("llama", tokenizer, seed=1, hidden=32, layers=1)


def fresh(tokenizer, seed):
    from fusechat.zoo.architectures import build_model

    return build_model("llama", tokenizer, seed=seed, hidden=32, layers=1)


def hand_logp(model, prompt_ids, answer_ids):
    """Σ_t log p(answer[t] | prompt, answer[:t]), one position at a time."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        total += torch.log_softmax(logits[t - 1], -1)[ids[0, t]].item()
    return total


def args(tmp_path, **kw):
    from trl import DPOConfig

    # bf16 off: TRL's configs default to it, which runs the reference model under bfloat16 autocast
    return DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none",
                     max_length=None, bf16=False, **kw)


@pytest.mark.parametrize("loss", ["sigmoid", "sigmoid_norm"])
def test_trl_dpo_loss_matches_a_hand_computation(tmp_path, tokenizer_dirs, loss):
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_bpe"]))
    policy, reference = fresh(tokenizer, 1), fresh(tokenizer, 2)
    plain_policy, plain_reference = copy.deepcopy(policy), copy.deepcopy(reference)  # before the trainer patches them
    beta = 0.5
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args(tmp_path, beta=beta, loss_type=[loss]),
                         train_dataset=Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")}
                                                          for p in PAIRS]), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    got = trainer.compute_loss(trainer.model, batch).item()
    expected = 0.0
    for r in rows:
        ratios = []
        for side in ("chosen_ids", "rejected_ids"):
            ratio = hand_logp(plain_policy, r["prompt_ids"], r[side]) - hand_logp(plain_reference, r["prompt_ids"],
                                                                                  r[side])
            ratios.append(ratio / len(r[side]) if loss == "sigmoid_norm" else ratio)
        expected += math.log1p(math.exp(-beta * (ratios[0] - ratios[1]))) / len(rows)
    assert got == pytest.approx(expected, rel=1e-5)


def test_wrpo_loss_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss = wrpo_loss(t(-2.0), t(-3.0), t(-4.0), t(-2.5), t(-2.5), t(-3.5), alpha=0.25, beta=0.5)
    # chosen: 0.25·0.5 + 0.75·(−0.5) = −0.25; rejected: −0.5; margin 0.25; β·margin 0.125
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.125)))
    # α = 1 is DPO on the source's answer; α = 0 DPO on the target's own
    assert wrpo_loss(t(-2.0), t(9.0), t(-4.0), t(-2.5), t(0.0), t(-3.5), 1.0, 0.5).item() == pytest.approx(
        math.log1p(math.exp(-0.5 * (0.5 + 0.5))))
    assert wrpo_alpha(0.6, 0.5, 0, 100) == 0 and wrpo_alpha(0.6, 0.5, 25, 100) == pytest.approx(0.3)
    assert wrpo_alpha(0.6, 0.5, 80, 100) == pytest.approx(0.6)


def test_sequence_logps_sums_the_completion_tokens_only(models):
    tokenizer, model = models
    prompt, answer = [5, 6, 7], [8, 9]
    ids = torch.tensor([prompt + answer + [0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        got = sequence_logps(model(input_ids=ids).logits, ids, mask).item()
    assert got == pytest.approx(hand_logp(model, prompt, answer), rel=1e-5)


def test_wrpo_trainer_loss_matches_a_hand_computation_and_trains(tmp_path, tokenizer_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_bpe"]))
    policy, reference = fresh(tokenizer, 3), fresh(tokenizer, 4)
    plain_policy, plain_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    beta, final_alpha = 0.5, 0.8
    trainer = WRPOTrainer(model=policy, ref_model=reference, args=args(tmp_path, beta=beta, max_steps=2),
                          train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer,
                          wrpo_alpha=final_alpha, wrpo_ramp=0.5)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 6
    trainer.state.global_step, trainer.state.max_steps = 1, 4  # α = 0.8 · 1 / (0.5 · 4) = 0.4
    alpha = trainer.current_alpha()
    assert alpha == pytest.approx(0.4)
    got = trainer.compute_loss(trainer.model, batch).item()

    def ratio(prompt, answer):
        return hand_logp(plain_policy, prompt, answer) - hand_logp(plain_reference, prompt, answer)

    expected = 0.0
    for r in rows:
        chosen = alpha * ratio(r["prompt_ids"], r["chosen_ids"]) + (1 - alpha) * ratio(r["target_prompt_ids"],
                                                                                     r["target_chosen_ids"])
        margin = chosen - ratio(r["prompt_ids"], r["rejected_ids"])
        expected += math.log1p(math.exp(-beta * margin)) / len(rows)
    assert got == pytest.approx(expected, rel=1e-5)
    trainer.state.global_step, trainer.state.max_steps = 0, 0
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    assert any("wrpo/alpha" in entry for entry in trainer.state.log_history)


def test_wrpo_needs_the_targets_own_answer(tmp_path, models):
    tokenizer, _ = models
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in PAIRS]
    with pytest.raises(ValueError, match="WRPO needs a 'target_chosen' answer"):
        WRPOTrainer(model=fresh(tokenizer, 5), ref_model=fresh(tokenizer, 6), args=args(tmp_path),
                    train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
