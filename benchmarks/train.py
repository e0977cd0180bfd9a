"""Benchmark of a fusion training step against plain fine-tuning.

1. The plain loss: same model (Llama architecture, hidden 512, 8 layers, vocabulary
   8,000), same batch (4 × 512 tokens), same optimizer (AdamW); the fusion step adds
   the sparse top-10 fusion term at λ = 0.9 to a λ = 1 step, both on full logits
   (``fusion_loss``). Ratios fusion / λ = 1, targets: time ≤ 1.15, peak memory ≤ 1.10.
2. The chunked loss on big vocabularies: a fusion step at λ = 0.9 with top-10 fused
   targets through the chunked head and loss, as ``FusionTrainer`` runs it, against
   plain Hugging Face fine-tuning of the same model on the same batch
   (``model(input_ids=..., labels=...).loss.backward()``), batch 1 × 1,024, AdamW.
   Two tiny models with real vocabularies: Gemma-3-shaped (``Gemma3ForCausalLM``,
   vocabulary 262,144, hidden 64, 2 layers, tied embeddings; targets: time ≤ 1.15,
   peak memory ≤ 0.6) and SmolLM2-shaped (Llama, vocabulary 49,152, hidden 64,
   2 layers, tied embeddings).

In every batch the first quarter of the positions is prompt (label −100). Each
variant runs in its own process (so that peak memory is its own), alternating,
several times; per run: warm-up steps, then the step time (median of the timed
steps) and the peak resident memory above the level before the timed steps
(sampled every millisecond); the best run of each variant counts.

    python benchmarks/train.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, T, V, K = 4, 512, 8000, 10
BIG_T = 1024
# Big-vocabulary pivots: name -> (architecture, vocabulary size)
PIVOTS = {"gemma3": ("gemma3_text", 262_144), "smollm2": ("llama", 49_152)}
PLAIN_VARIANTS = ("sft", "fusion")
BIG_VARIANTS = tuple(f"{p}_{v}" for p in PIVOTS for v in ("hf_sft", "chunked_fusion"))


def big_vocab_model(arch: str, vocab: int):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from fusechat.zoo.architectures import tiny_config

    if arch == "gemma3_text":
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=512,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    else:
        config = tiny_config(arch, vocab, hidden=64, layers=2, heads=4, tie=True)
    return AutoModelForCausalLM.from_config(config)


def worker(variant: str, steps: int, warmup: int) -> dict:
    import torch
    from peak_rss import PeakRSS

    from fusechat.train.chunked_loss import chunked_fusion_loss
    from fusechat.train.loss import fusion_loss
    from fusechat.train.trainer import chunkable_head, head_computes_loss
    from fusechat.zoo.architectures import tiny_config

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    if variant in PLAIN_VARIANTS:
        batch, length, vocab = B, T, V
        model = AutoModelForCausalLM.from_config(tiny_config("llama", V, hidden=512, layers=8, heads=8))
    else:
        pivot, _, kind = variant.partition("_")
        arch, vocab = PIVOTS[pivot]
        batch, length = 1, BIG_T
        model = big_vocab_model(arch, vocab)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = input_ids.clone()
    labels[:, : length // 4] = -100
    fused_ids = torch.randint(0, vocab, (batch, length, K), generator=g)
    fused_probs = torch.softmax(torch.randn(batch, length, K, generator=g), dim=-1)
    fusion_mask = labels != -100

    if variant in PLAIN_VARIANTS:
        lambda_ = 1.0 if variant == "sft" else 0.9

        def loss():
            logits = model(input_ids=input_ids).logits
            return fusion_loss(logits, labels, fused_ids if lambda_ < 1 else None, fused_probs if lambda_ < 1 else None,
                               fusion_mask if lambda_ < 1 else None, lambda_).loss
    elif kind == "hf_sft":
        def loss():
            return model(input_ids=input_ids, labels=labels).loss
    else:
        head, softcap = chunkable_head(model)

        def loss():
            def from_hidden(hidden):
                return chunked_fusion_loss(hidden, head.weight, head.bias, labels, fused_ids, fused_probs,
                                           fusion_mask, 0.9, softcap=softcap)

            with head_computes_loss(head, from_hidden, labels.shape) as box:
                model(input_ids=input_ids)
            return box["parts"].loss

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    with PeakRSS() as peak:
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "peak_delta_bytes": peak.delta_bytes}


def run_variants(variants, rounds: int, steps: int, warmup: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps),
                                  "--warmup", str(warmup)], capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run, plain-loss comparison")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, plain-loss comparison")
    parser.add_argument("--big-steps", type=int, default=3, help="timed steps per run, big vocabularies")
    parser.add_argument("--big-rounds", type=int, default=2, help="runs per variant, big vocabularies")
    parser.add_argument("--worker", choices=[*PLAIN_VARIANTS, *BIG_VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return 0

    results = run_variants(PLAIN_VARIANTS, args.rounds, args.steps, warmup=2)
    results.update(run_variants(BIG_VARIANTS, args.big_rounds, args.big_steps, warmup=1))
    time_sft = min(r["step_s"] for r in results["sft"])
    time_fusion = min(r["step_s"] for r in results["fusion"])
    mem_sft = min(r["peak_delta_bytes"] for r in results["sft"])
    mem_fusion = min(r["peak_delta_bytes"] for r in results["fusion"])
    result = {
        "time_ratio": round(time_fusion / time_sft, 3),
        "peak_memory_ratio": round(mem_fusion / mem_sft, 3),
        "sft_step_s": round(time_sft, 4),
        "fusion_step_s": round(time_fusion, 4),
        "sft_peak_mib": round(mem_sft / 2**20, 1),
        "fusion_peak_mib": round(mem_fusion / 2**20, 1),
    }
    print(f"step time   lambda=1 {time_sft:.3f} s   fusion {time_fusion:.3f} s")
    print(f"peak memory lambda=1 {result['sft_peak_mib']} MiB   fusion {result['fusion_peak_mib']} MiB (above the pre-step level)")
    print(f"time_ratio        {result['time_ratio']:.3f}   (target <= 1.15)")
    print(f"peak_memory_ratio {result['peak_memory_ratio']:.3f}   (target <= 1.10)")
    for pivot, (_, vocab) in PIVOTS.items():
        prefix = "" if pivot == "gemma3" else f"{pivot}_"
        best = {kind: (min(r["step_s"] for r in results[f"{pivot}_{kind}"]),
                       min(r["peak_delta_bytes"] for r in results[f"{pivot}_{kind}"]))
                for kind in ("hf_sft", "chunked_fusion")}
        (t_sft, m_sft), (t_chunked, m_chunked) = best["hf_sft"], best["chunked_fusion"]
        result.update({
            f"{prefix}chunked_peak_memory_vs_hf_sft": round(m_chunked / m_sft, 3),
            f"{prefix}chunked_time_vs_hf_sft": round(t_chunked / t_sft, 3),
            f"{pivot}_hf_sft_step_s": round(t_sft, 4),
            f"{pivot}_chunked_fusion_step_s": round(t_chunked, 4),
            f"{pivot}_hf_sft_peak_mib": round(m_sft / 2**20, 1),
            f"{pivot}_chunked_fusion_peak_mib": round(m_chunked / 2**20, 1),
        })
        target = "   (targets: time <= 1.15, peak memory <= 0.6)" if pivot == "gemma3" else ""
        print(f"{pivot} shape (vocabulary {vocab:,}, 1 x {BIG_T}): HF fine-tuning {t_sft:.3f} s, "
              f"{m_sft / 2**20:.1f} MiB; chunked fusion {t_chunked:.3f} s, {m_chunked / 2**20:.1f} MiB")
        print(f"{prefix}chunked_time_vs_hf_sft {t_chunked / t_sft:.3f}   "
              f"{prefix}chunked_peak_memory_vs_hf_sft {m_chunked / m_sft:.3f}{target}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
