"""Tiny causal LMs of the real architectures, built from transformers configs.

Used by the tests, the benchmarks and the demo zoo: the code paths are the
same as for hub models, only the sizes differ.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "gpt2", "gemma")


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, tie: bool = False,
                max_positions: int = 2048, bos_id: int | None = None, eos_id: int | None = None,
                pad_id: int | None = None):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
    )

    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=tie)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_positions=max_positions, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  max_position_embeddings=max_positions, **ids)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=hidden // heads)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def build_model(arch: str, tokenizer, out_dir: str | Path | None = None, seed: int = 0, vocab_padding: int = 0,
                **config_kwargs):
    """A randomly initialised tiny model for ``tokenizer`` (saved with it to ``out_dir`` if given).

    ``vocab_padding`` adds unused embedding rows past the tokenizer's vocabulary,
    as Qwen models have.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        arch, vocab_size=len(tokenizer) + vocab_padding, bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model
