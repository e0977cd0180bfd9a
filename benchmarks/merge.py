"""Benchmark of the merge engine against mergekit, on three models of about 134M parameters.

Builds a pivot (Llama architecture: hidden 768, 12 layers, vocabulary 32,000, fp32,
~540 MB) and two targets that moved every tensor by different amounts, then runs,
each in its own process: mergekit's linear merge of the two targets (the
reference), fusechat's linear merge, and fusechat's VaRM merge (which also reads the
pivot). Reports wall times relative to mergekit's linear merge (target for VaRM
≤ 1.2), each from a flushed page cache to its output on disk (fusechat syncs its
output before renaming it into place; mergekit does not), and fusechat VaRM's peak
resident memory above its level before merging, as a share of one model's size
(target: well under 1).

    python benchmarks/merge.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path) -> int:
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fusechat.zoo.architectures import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", 32000, hidden=768, layers=12, heads=12)
    config.intermediate_size = 2048
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "pivot")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    g = torch.Generator().manual_seed(1)
    for name, scale in (("a", 1e-3), ("b", 3e-3)):
        folder = root / "run" / "targets" / name
        folder.mkdir(parents=True)
        moved = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        (folder / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": name}))
        del moved
    (root / "d.jsonl").write_text("")
    for method in ("varm", "linear"):
        cfg = {"run_dir": str(root / "run"), "pivot": {"name": "pivot", "path": str(root / "pivot")},
               "sources": [{"name": "a", "path": str(root / "pivot")}, {"name": "b", "path": str(root / "pivot")}],
               "data": {"paths": [str(root / "d.jsonl")]}, "merge": {"method": method}}
        (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    return size


def worker(kind: str, root: Path) -> dict:
    from peak_rss import PeakRSS

    if kind == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        config = MergeConfiguration.model_validate({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(root / "run" / "targets" / t), "parameters": {"weight": 0.5}} for t in ("a", "b")]})

        def job():
            run_merge(config, str(root / "mergekit-linear"), MergeOptions(quiet=True, copy_tokenizer=False,
                                                                         write_model_card=False))
    else:
        from fusechat.config import load_config
        from fusechat.merge import run

        cfg = load_config(root / f"{kind}.yaml")

        def job():
            run(cfg, force=True)

    # Every variant starts with no dirty page of an earlier one and stops once its output is on disk:
    # fusechat syncs its output before renaming it into place (crash safety), mergekit does not, and an
    # unsynced earlier run would otherwise be flushed on the clock of the next.
    os.sync()
    with PeakRSS(interval=0.005) as peak:
        started = time.perf_counter()
        job()
        os.sync()
        elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "peak_delta_bytes": peak.delta_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.root)))
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_bytes = build(root)
        results: dict[str, list[dict]] = {"mergekit": [], "linear": [], "varm": []}
        for _ in range(args.rounds):
            for kind in results:
                out = subprocess.run([sys.executable, __file__, "--worker", kind, "--root", str(root)],
                                     capture_output=True, text=True, env=env, check=True)
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {k: min(r["seconds"] for r in v) for k, v in results.items()}
    peak = min(r["peak_delta_bytes"] for r in results["varm"])
    result = {
        "varm_time_ratio": round(best["varm"] / best["mergekit"], 3),
        "linear_time_ratio": round(best["linear"] / best["mergekit"], 3),
        "peak_rss_vs_model_size": round(peak / model_bytes, 3),
        "mergekit_linear_s": round(best["mergekit"], 2),
        "fusechat_linear_s": round(best["linear"], 2),
        "fusechat_varm_s": round(best["varm"], 2),
        "model_mib": round(model_bytes / 2**20, 1),
        "varm_peak_rss_mib": round(peak / 2**20, 1),
    }
    print(f"model size {result['model_mib']} MiB")
    print(f"mergekit linear {best['mergekit']:.2f} s   fusechat linear {best['linear']:.2f} s   "
          f"fusechat VaRM {best['varm']:.2f} s")
    print(f"varm_time_ratio        {result['varm_time_ratio']:.3f}   (target <= 1.2)")
    print(f"linear_time_ratio      {result['linear_time_ratio']:.3f}")
    print(f"peak_rss_vs_model_size {result['peak_rss_vs_model_size']:.3f}   (VaRM, {result['varm_peak_rss_mib']} MiB)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
