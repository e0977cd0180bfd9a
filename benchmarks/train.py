"""Benchmark of a fusion training step against a λ = 1 (plain fine-tuning) step.

Same model (Llama architecture, hidden 512, 8 layers, vocabulary 8,000), same batch
(4 × 512 tokens), same optimizer (AdamW); the fusion step adds the sparse top-10
fusion term at λ = 0.9. Each variant runs in its own process (so that peak memory is
its own), twice, alternating; per run: two warm-up steps, then the step time (median
of the timed steps) and the peak resident memory above the level before the timed
steps (sampled every millisecond). Prints the ratios fusion / λ = 1, targets: time
≤ 1.15, peak memory ≤ 1.10.

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


def worker(variant: str, steps: int) -> dict:
    import torch
    from peak_rss import PeakRSS

    from fusechat.train.loss import fusion_loss
    from fusechat.zoo.models import tiny_config

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", V, hidden=512, layers=8, heads=8))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    labels[:, : T // 4] = -100
    fused_ids = torch.randint(0, V, (B, T, K), generator=g)
    fused_probs = torch.softmax(torch.randn(B, T, K, generator=g), dim=-1)
    fusion_mask = labels != -100
    lam = 1.0 if variant == "sft" else 0.9

    def step():
        logits = model(input_ids=input_ids).logits
        parts = fusion_loss(logits, labels, fused_ids if lam < 1 else None, fused_probs if lam < 1 else None,
                            fusion_mask if lam < 1 else None, lam)
        parts.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    with PeakRSS() as peak:
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "peak_delta_bytes": peak.delta_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["sft", "fusion"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0

    results: dict[str, list[dict]] = {"sft": [], "fusion": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(args.rounds):
        for variant in ("sft", "fusion"):
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
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
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
