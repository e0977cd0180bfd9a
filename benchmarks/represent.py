"""Benchmark of the represent stage: throughput against a bare forward pass, and bytes per token.

Builds a small Llama-architecture model and a byte-level BPE tokenizer, prepares
synthetic conversations, then in one run times

- ``represent``: tokenization, forward, top-k and cross-entropy on the device,
  Parquet writes (the stage's own tokens/s, model loading excluded), and
- a bare forward pass of the same model over the same batches,

alternating the two a few times and keeping each one's best. Prints the ratio
(target ≥ 0.9) and the bytes per token on disk (target ≤ 64 at k = 10).

    python benchmarks/represent.py [--json PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "din", "qua", "ph", "ix", "an", "bre", "zu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def sentence(k):
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    convs = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"from": "human", "value": sentence(rng.randint(8, 40))},
                      {"from": "gpt", "value": " ".join(sentence(rng.randint(10, 30)) for _ in range(rng.randint(2, 8)))}]
        convs.append({"id": f"c{i}", "conversations": turns})
    return convs


def build(root: Path, n_conversations: int):
    import yaml

    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    convs = synthetic_conversations(n_conversations)
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    texts = [t["value"] for c in convs[:200] for t in c["conversations"]]
    tok = build_tokenizer("byte_bpe", texts, vocab_size=8000)
    # Proportions of a small real chat model (hidden 512, 8 layers): the top-k and CE work per
    # token relative to the forward pass is what the ratio measures.
    build_model("llama", tok, out_dir=root / "model", hidden=512, layers=8, heads=8)
    cfg = {
        "run_dir": str(root / "run"),
        "pivot": {"name": "pivot", "path": str(root / "model")},
        "sources": [{"name": "unused", "path": str(root / "model")}],
        "data": {"paths": [str(data)]},
        "prepare": {"max_length": 1024},
        "represent": {"dtype": "fp32", "device": "cpu", "batch_size": 8, "shard_size": 64},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run.yaml"


def time_represent(cfg) -> tuple[float, float]:
    from fusechat import represent
    from fusechat.rundir import read_manifest

    out = represent.represent_model(cfg, cfg.pivot, force=True)
    manifest = read_manifest(out)
    return manifest["tokens_per_s"], manifest["bytes_per_token"]


def time_bare_forward(cfg) -> float:
    """Forward passes over the batches represent makes: same encoding, order and padding."""
    import torch

    from fusechat.model_loading import load_causal_lm, load_tokenizer
    from fusechat.prepare import load_prepared
    from fusechat.represent import encode_rows
    from fusechat.rundir import RunDir, read_manifest

    prepared = load_prepared(cfg)
    pm = read_manifest(RunDir(cfg.run_dir).stage("prepare"))
    tok = load_tokenizer(cfg.pivot)
    model = load_causal_lm(cfg.pivot, "fp32", "cpu")
    encoded = encode_rows(tok, prepared[:], 0, tok.eos_token, pm["add_special_tokens"])
    size, bs = cfg.represent.shard_size, cfg.represent.batch_size
    batches = []
    for a in range(0, len(encoded), size):
        shard = encoded[a : a + size]
        for c in range(0, len(shard), bs * 4):
            chunk = shard[c : c + bs * 4]
            order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].input_ids))
            batches += [[chunk[i] for i in order[b : b + bs]] for b in range(0, len(order), bs)]
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            lengths = [len(e.input_ids) for e in batch]
            ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(batch):
                ids[i, : lengths[i]] = torch.from_numpy(e.input_ids)
                mask[i, : lengths[i]] = 1
            model(input_ids=ids, attention_mask=mask)
            tokens += sum(lengths)
    return tokens / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from fusechat import prepare
    from fusechat.config import load_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(build(Path(tmp), args.conversations))
        prepare.run(cfg)
        best_stage = best_bare = 0.0
        bytes_per_token = None
        for _ in range(args.repeats):
            best_bare = max(best_bare, time_bare_forward(cfg))
            tps, bytes_per_token = time_represent(cfg)
            best_stage = max(best_stage, tps)
    result = {
        "throughput_ratio": round(best_stage / best_bare, 3),
        "bytes_per_token": bytes_per_token,
        "represent_tokens_per_s": round(best_stage, 1),
        "bare_forward_tokens_per_s": round(best_bare, 1),
    }
    print(f"represent  {best_stage:,.0f} tokens/s")
    print(f"bare fwd   {best_bare:,.0f} tokens/s")
    print(f"throughput_ratio {result['throughput_ratio']:.3f}   (target >= 0.9)")
    print(f"bytes_per_token  {bytes_per_token:.2f}   (target <= 64 at k = 10)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
