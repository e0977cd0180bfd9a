"""Benchmark of what generation and scoring cost on this machine, to size a run before starting it.

For one model (``--model FOLDER``, e.g. a converted GGUF model under ``$FUSECHAT_CACHE/gguf``;
by default a small Llama built here) it times, in one run:

- reading prompts (prefill): tokens per second over a batch of ``--prompt-tokens``-long prompts;
- greedy decoding with ``fusechat.generation.greedy_until`` at each batch size of ``--batches``:
  milliseconds per step and new tokens per second (a row never finishes early here);
- scoring (``scored_bits``, as HumanEval's canonical bits and MT-Bench's reference bits use it)
  with logits only from the first scored position, against the same pass projecting every
  position onto the vocabulary: the time ratio (below 1 is the saving) and the largest
  relative difference in bits (0 expected).

Each measurement alternates ``--repeats`` times and keeps its best. Sampling, HumanEval and
MT-Bench answers cost about (new tokens) / (new tokens per second at the run's batch size),
plus the prompts at the prefill rate.

    python benchmarks/generation.py [--model FOLDER] [--dtype bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from timing import best_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build(root: Path) -> Path:
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    tok = build_tokenizer("byte_bpe", texts, vocab_size=8000)
    build_model("llama", tok, out_dir=root / "model", hidden=512, layers=8, heads=8)
    return root / "model"


def prompts(vocab: int, specials: set[int], count: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, length), generator=gen)
    usable = [i for i in range(vocab) if i not in specials]
    return [[t if t not in specials else usable[t % len(usable)] for t in row] for row in ids.tolist()]


def all_logits(model):
    """``model`` whose forward projects every position (the scoring before logits were kept), then keeps the
    positions asked for, so callers index the same rows."""
    forward = model.forward

    def every_position(*args, logits_to_keep=0, **kwargs):
        out = forward(*args, **kwargs)
        if logits_to_keep:
            out.logits = out.logits[:, -logits_to_keep:]
        return out

    return every_position


def measure(model_dir: Path, batch_sizes: list[int], prompt_tokens: int, steps: int, answer_tokens: int,
            repeats: int, dtype: str = "fp32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat.generation import greedy_until, scored_bits

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype])).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    specials = set(tokenizer.all_special_ids)
    never = lambda ids: False  # noqa: E731 - every row runs all its steps
    results = {"model": str(model_dir), "dtype": dtype, "threads": torch.get_num_threads(), "vocab": vocab,
               "prompt_tokens": prompt_tokens, "steps": steps}

    width = max(batch_sizes)
    batch = prompts(vocab, specials, width, prompt_tokens)
    prefill = best_of(lambda: greedy_until(model, batch, 1, 0, width, never), repeats)
    results["prefill_tokens_per_s"] = width * prompt_tokens / prefill
    for size in batch_sizes:
        rows = batch[:size]
        first = best_of(lambda: greedy_until(model, rows, 1, 0, size, never), repeats)
        whole = best_of(lambda: greedy_until(model, rows, steps + 1, 0, size, never), repeats)
        per_step = max(whole - first, 1e-9) / steps
        results[f"decode_ms_per_step_b{size}"] = per_step * 1000
        results[f"decode_tokens_per_s_b{size}"] = size / per_step

    seqs = [(ids, prompt_tokens - answer_tokens) for ids in batch]
    size = min(16, width)
    kept_bits = scored_bits(model, tokenizer, seqs, size)
    kept = best_of(lambda: scored_bits(model, tokenizer, seqs, size), repeats)
    model.forward = all_logits(model)
    full_bits = scored_bits(model, tokenizer, seqs, size)
    full = best_of(lambda: scored_bits(model, tokenizer, seqs, size), repeats)
    results["scoring_s_kept"], results["scoring_s_all_positions"] = kept, full
    results["scoring_kept_vs_all"] = kept / full
    results["scoring_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(kept_bits, full_bits))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a small Llama built here)")
    parser.add_argument("--batches", default="1,8,16,32", help="decoding batch sizes, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=320)
    parser.add_argument("--steps", type=int, default=24, help="decoding steps timed per batch size")
    parser.add_argument("--answer-tokens", type=int, default=80, help="scored tokens at the end of each sequence")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build(Path(tmp))
        results = measure(model_dir, sizes, args.prompt_tokens, args.steps, args.answer_tokens, args.repeats,
                          args.dtype)
    print(f"{results['model']} ({results['dtype']}): {results['threads']} threads, vocabulary {results['vocab']}")
    print(f"prefill: {results['prefill_tokens_per_s']:.0f} tokens/s ({results['prompt_tokens']}-token prompts)")
    print("| batch | ms per decoding step | new tokens/s |\n|---:|---:|---:|")
    for size in sizes:
        print(f"| {size} | {results[f'decode_ms_per_step_b{size}']:.0f} | "
              f"{results[f'decode_tokens_per_s_b{size}']:.1f} |")
    print(f"scoring, logits kept from the first scored position vs every position: "
          f"{results['scoring_kept_vs_all']:.3f}× the time (largest bits difference "
          f"{results['scoring_max_rel_diff']:.1e} relative)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
