"""The chunked lm-head + loss against the plain ``fusion_loss`` on full logits: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from fusechat.train.chunked_loss import chunked_fusion_loss, default_chunk_size
from fusechat.train.loss import fusion_loss

B, T, H, V, K = 3, 11, 6, 17, 4


def batch(seed=0, gold_share=0.7, fusion_share=0.6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) >= gold_share] = -100
    ids = torch.randint(0, V, (B, T, K), generator=g)
    ids[0, 2, 1] = ids[0, 2, 0]  # a repeated id: both entries count
    probs = torch.softmax(torch.randn(B, T, K, generator=g), dim=-1)
    probs[1, 3, -1] = 0.0  # a padded entry
    mask = torch.rand(B, T, generator=g) < fusion_share
    return hidden, weight, bias, labels, ids, probs, mask


def plain(hidden, weight, bias, labels, ids, probs, mask, lambda_, kind="ce", temperature=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return fusion_loss(logits, labels, ids, probs, mask, lambda_, kind, temperature)


def assert_same(hidden, weight, bias, labels, ids, probs, mask, lambda_, kind="ce", temperature=1.0, softcap=None,
                chunk_size=4):
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    ref = plain(hidden, weight, bias, labels, ids, probs, mask, lambda_, kind, temperature, softcap)
    got = chunked_fusion_loss(hidden, weight, bias, labels, ids, probs, mask, lambda_, kind, temperature, chunk_size,
                              softcap)
    assert (got.gold_tokens, got.fusion_positions) == (ref.gold_tokens, ref.fusion_positions)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.gold, ref.gold, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.fusion, ref.fusion, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref.loss, inputs, allow_unused=True)
    got_grads = torch.autograd.grad(got.loss, inputs, allow_unused=True)
    for name, r, c in zip(("hidden", "weight", "bias"), ref_grads, got_grads):
        r = torch.zeros_like(c) if r is None else r  # nothing scored: the plain graph may not reach an input
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"grad wrt {name}: {m}")
    return got


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_matches_the_plain_loss(lambda_, chunk_size):
    assert_same(*batch(), lambda_=lambda_, chunk_size=chunk_size)


@pytest.mark.parametrize("kind,temperature", [("kl", 1.0), ("ce", 2.0), ("kl", 0.5)])
def test_kl_and_temperature(kind, temperature):
    assert_same(*batch(1), lambda_=0.3, kind=kind, temperature=temperature)


def test_without_bias_and_with_soft_capping():
    hidden, weight, _, *rest = batch(2)
    assert_same(hidden, weight, None, *rest, lambda_=0.9)
    hidden, weight, bias, *rest = batch(3)
    with torch.no_grad():
        weight.mul_(3.0)  # logits large enough for the cap to bend them
    assert_same(hidden, weight, bias, *rest, lambda_=0.5, softcap=2.0)


def test_lambda_one_without_fused_targets():
    hidden, weight, bias, labels, *_ = batch(4)
    got = assert_same(hidden, weight, bias, labels, None, None, None, lambda_=1.0)
    assert got.fusion_positions == 0 and got.fusion.item() == 0.0
    # As the plain loss: without fused targets the loss is the gold term, whatever λ.
    assert_same(hidden, weight, bias, labels, None, None, None, lambda_=0.9)


def test_masked_stretches_longer_than_a_chunk():
    hidden, weight, bias, labels, ids, probs, mask = batch(5)
    labels[:, :8] = -100  # eight masked positions: whole chunks of 3 with nothing to score
    mask[:, :8] = False
    labels[2] = -100  # and a sequence with nothing at all
    mask[2] = False
    mask[0, 9] = True  # a position in the fusion term only
    labels[0, 10] = -100
    mask[1, 9] = False  # a position in the gold term only
    labels[1, 10] = 5
    assert_same(hidden, weight, bias, labels, ids, probs, mask, lambda_=0.9, chunk_size=3)


def test_no_gold_tokens_and_nothing_to_score():
    hidden, weight, bias, labels, ids, probs, mask = batch(6)
    labels[:] = -100
    got = assert_same(hidden, weight, bias, labels, ids, probs, mask, lambda_=0.9)
    assert got.gold_tokens == 0 and got.fusion_positions > 0
    mask[:] = False
    got = assert_same(hidden, weight, bias, labels, ids, probs, mask, lambda_=0.9)
    assert got.loss.item() == 0.0
    assert_same(hidden, weight, bias, labels, None, None, None, lambda_=1.0)


def test_incoming_gradient_scales_the_result():
    hidden, weight, bias, *rest = batch(7)
    ref = plain(hidden, weight, bias, *rest, lambda_=0.9)
    got = chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=0.9, chunk_size=5)
    ref_grads = torch.autograd.grad(ref.loss * -2.5, [hidden, weight, bias])
    got_grads = torch.autograd.grad(got.loss * -2.5, [hidden, weight, bias])
    for r, c in zip(ref_grads, got_grads):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-6)


def test_tied_embedding_gets_both_gradients():
    # The head is the embedding matrix: its gradient is the input side's plus the head's.
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(V, H, generator=g, requires_grad=True)
    proj = torch.randn(H, H, generator=g, requires_grad=True)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    _, _, _, labels, ids, probs, mask = batch(8)

    def hidden():
        return torch.tanh(F.embedding(input_ids, emb) @ proj)

    ref = fusion_loss(F.linear(hidden(), emb), labels, ids, probs, mask, 0.9)
    got = chunked_fusion_loss(hidden(), emb, None, labels, ids, probs, mask, 0.9, chunk_size=4)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for r, c in zip(torch.autograd.grad(ref.loss, [emb, proj]), torch.autograd.grad(got.loss, [emb, proj])):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_no_grad():
    hidden, weight, bias, *rest = batch(9)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    ref = plain(hidden, weight, bias, *rest, lambda_=0.9)
    got = chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=0.9, chunk_size=4)
    torch.testing.assert_close(torch.autograd.grad(got.loss, hidden)[0], torch.autograd.grad(ref.loss, hidden)[0],
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        got = chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=0.9, chunk_size=4)
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, ref.loss.detach(), rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_as_the_plain_head():
    hidden, weight, bias, *rest = batch(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(hidden, weight, bias, *rest, lambda_=0.9)
        got = chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=0.9, chunk_size=4)
    # Both round the head's inputs to bf16; the rest is fp32 in both.
    torch.testing.assert_close(got.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for r, c in zip(torch.autograd.grad(ref.loss, [hidden, weight, bias]),
                    torch.autograd.grad(got.loss, [hidden, weight, bias])):
        assert c.dtype == r.dtype
        torch.testing.assert_close(c, r, rtol=5e-2, atol=5e-3)


def test_rejects_bad_arguments():
    hidden, weight, bias, *rest = batch()
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
        chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_fusion_loss(hidden, weight, bias, *rest, lambda_=0.9, chunk_size=0)
    assert default_chunk_size(262_144) == 128 and default_chunk_size(10) >= 16


# ------------------------------------------------------------------ inside FusionTrainer


def tiny_model(arch, vocab=96, tie=False):
    from transformers import AutoModelForCausalLM

    from fusechat.zoo.architectures import tiny_config

    torch.manual_seed(0)
    if arch in ("llama", "mistral", "mixtral", "qwen2", "gpt2", "gemma"):
        config = tiny_config(arch, vocab, hidden=32, layers=1, heads=4, tie=tie)
        if arch == "gpt2":
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    else:
        from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

        common = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": tie}
        config = {
            "qwen3": lambda: Qwen3Config(**common),
            "phi3": lambda: Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"}, pad_token_id=0),
            # A small cap, so that capping changes the logits of a random model.
            "gemma2": lambda: Gemma2Config(**common, final_logit_softcapping=0.5),
            "gemma3_text": lambda: Gemma3TextConfig(**common, final_logit_softcapping=0.5),
        }[arch]()
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == arch
    return model.eval()  # no dropout; gradients still flow


def trainer_for(model, tmp_path, **kwargs):
    from transformers import TrainingArguments

    from fusechat.train.trainer import FusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return FusionTrainer(model=model, args=args, lambda_=0.7, fusion_kind="kl", temperature=1.5, **kwargs)


def trainer_inputs(vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 13), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 10:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "fused_ids": torch.randint(0, vocab, (2, 13, 3), generator=g),
            "fused_probs": torch.softmax(torch.randn(2, 13, 3, generator=g), dim=-1),
            "fusion_mask": labels != -100}


@pytest.mark.parametrize("arch,tie", [("llama", False), ("mistral", False), ("mixtral", False), ("qwen2", False),
                                      ("qwen3", True), ("gpt2", True), ("gemma", True), ("gemma2", True),
                                      ("gemma3_text", True), ("phi3", False)])
def test_trainer_chunked_equals_plain(arch, tie, tmp_path, monkeypatch):
    from fusechat.train import trainer as trainer_module
    from fusechat.train.trainer import CHUNKED_MODEL_TYPES

    assert arch in CHUNKED_MODEL_TYPES
    calls = []
    real = trainer_module.chunked_fusion_loss
    monkeypatch.setattr(trainer_module, "chunked_fusion_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(arch, tie=tie)
    results = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        trainer = trainer_for(model, tmp_path, chunked_loss=chunked, loss_chunk_size=5)
        loss = trainer.compute_loss(model, trainer_inputs())
        loss.backward()
        results[chunked] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == 1  # the chunked run took the chunked path, the plain one did not
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results[False], results[True]
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # The head is itself again afterwards.
    assert "forward" not in model.get_output_embeddings().__dict__
    logits = model(input_ids=trainer_inputs()["input_ids"]).logits
    assert logits.shape == (2, 13, 96)


def test_evaluation_loss_is_the_same(tmp_path):
    model = tiny_model("llama")
    losses = []
    for chunked in (False, True):
        trainer = trainer_for(model, tmp_path, chunked_loss=chunked)
        loss, _, _ = trainer.prediction_step(model, trainer_inputs(seed=1), prediction_loss_only=True)
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_heads_it_cannot_stand_in_for_keep_the_plain_path():
    from peft import LoraConfig, get_peft_model

    from fusechat.train.trainer import chunkable_head

    model = tiny_model("llama")
    assert chunkable_head(model)[0] is model.lm_head
    lora_body = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert chunkable_head(lora_body) is not None  # the head itself is untouched
    lora_head = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert chunkable_head(lora_head) is None
    remote = tiny_model("llama")
    remote.__class__ = type("RemoteCodeLlama", (type(remote),), {})  # a class from outside transformers
    assert chunkable_head(remote) is None
    model.config.model_type = "cohere"  # an architecture that scales its logits after the head
    assert chunkable_head(model) is None
    softcapped = tiny_model("gemma2")
    assert chunkable_head(softcapped)[1] == 0.5


def test_auto_chunks_only_big_vocabularies(tmp_path, monkeypatch):
    from fusechat.train import trainer as trainer_module

    model = tiny_model("llama")
    vocab = model.lm_head.weight.shape[0]
    assert trainer_for(model, tmp_path, chunked_loss="auto")._chunked_target(model) is None  # a tiny vocabulary
    assert trainer_for(model, tmp_path, chunked_loss=True)._chunked_target(model)[0] is model.lm_head
    assert trainer_for(model, tmp_path, chunked_loss=False)._chunked_target(model) is None
    monkeypatch.setattr(trainer_module, "AUTO_MIN_VOCAB", vocab)  # as if the vocabulary were big enough
    assert trainer_for(model, tmp_path, chunked_loss="auto")._chunked_target(model)[0] is model.lm_head
