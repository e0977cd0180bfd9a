"""``fusechat demo``: the pipeline on a built-in sample, with no GPU and no model hub.

The demo trains tiny tokenizers of three families on the sample conversations
(the pivot: byte-level BPE; the sources: SentencePiece-style BPE with byte
fallback, and character level), builds a tiny model of a different architecture
for each (Llama, Mixtral, GPT-2), writes a run config for them, and runs every
stage this version of fusechat has, skipping complete ones on a rerun.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import yaml

from fusechat.config import load_config
from fusechat.progress import console
from fusechat.run import STAGES, read_manifest
from fusechat.stages import available, run_stage, stage_outputs

SAMPLE_FILES = ("sample_sharegpt.jsonl", "sample_openai.jsonl")
# name -> (architecture, tokenizer family): three architectures, three tokenizer families.
DEMO_MODELS = {"pivot": ("llama", "byte_bpe"), "mixtral-sp": ("mixtral", "sp_bpe"), "gpt2-char": ("gpt2", "char")}


def sample_texts(paths: list[Path]) -> list[str]:
    import json

    texts = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for turn in record.get("conversations", record.get("messages", [])):
                content = turn.get("value", turn.get("content"))
                texts.append(content if isinstance(content, str) else " ".join(p["text"] for p in content))
    return texts + ["GPT4 Correct User:", "GPT4 Correct Assistant:"]


def write_demo_inputs(out: Path) -> Path:
    """Sample data, tokenizers and ``demo.yaml`` under ``out``; returns the config path."""
    from fusechat.zoo.models import build_model
    from fusechat.zoo.tokenizers import CHATML_JINJA, build_tokenizer

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_FILES:
        target = data_dir / name
        with resources.as_file(resources.files("fusechat.resources") / name) as src:
            shutil.copyfile(src, target)
        paths.append(target)
    texts = sample_texts(paths)
    for seed, (name, (arch, family)) in enumerate(DEMO_MODELS.items()):
        folder = out / "models" / name
        if not (folder / "model.safetensors").exists():
            tok = build_tokenizer(family, texts, vocab_size=600, chat_template=CHATML_JINJA)
            build_model(arch, tok, out_dir=folder, seed=seed, hidden=64, layers=2)
    from fusechat.zoo.skills import SKILLS, eval_items

    eval_path = data_dir / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(item) + "\n" for skill in SKILLS for item in eval_items(skill, 4)),
                         encoding="utf-8")
    config = {
        "run_dir": str(out / "run"),
        "pivot": {"name": "pivot", "path": str(out / "models" / "pivot")},
        "sources": [{"name": n, "path": str(out / "models" / n)} for n in DEMO_MODELS if n != "pivot"],
        "data": {"paths": [str(p) for p in paths], "on_bad_record": "error"},
        "prepare": {"template": "openchat", "max_length": 160},
        "represent": {"dtype": "fp32", "device": "cpu", "batch_size": 8},
        "train": {"epochs": 3, "global_batch_size": 4, "per_device_batch_size": 2, "learning_rate": 1e-3,
                  "warmup_ratio": 0.1, "logging_steps": 5},
        "merge": {"method": "varm", "baselines": ["sce", "linear", "task_arithmetic", "ties", "dare", "slerp"]},
        "eval": {"data": [str(eval_path)], "max_new_tokens": 16},
    }
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config_path


def run_demo(out: Path, force: bool = False) -> None:
    out = Path(out)
    config_path = write_demo_inputs(out)
    cfg = load_config(config_path)
    console.print(f"demo run config: {config_path}")
    for stage in STAGES:
        if not available(stage):
            continue
        console.rule(f"[bold]{stage}")
        run_stage(stage, cfg, force=force)
    console.rule("[bold]demo")
    for stage in STAGES:
        if not available(stage):
            console.print(f"  {stage:<10} not built yet in this version")
            continue
        for folder in stage_outputs(cfg, stage):
            state = "complete" if (read_manifest(folder) or {}).get("complete") else "incomplete"
            console.print(f"  {stage:<10} {state:<11} {folder}")
