"""``fusechat demo``: the pipeline on a built-in sample, with no GPU and no model hub.

The demo trains tiny tokenizers of three families on the sample conversations
(the pivot: byte-level BPE; the sources: SentencePiece-style BPE with byte
fallback, and character level), writes a run config for them, and runs every
stage this version of fusechat has, skipping complete ones on a rerun.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import yaml

from fusechat.config import load_config
from fusechat.progress import console
from fusechat.run import STAGES, read_manifest, RunDir
from fusechat.stages import available, run_stage

SAMPLE_FILES = ("sample_sharegpt.jsonl", "sample_openai.jsonl")
DEMO_MODELS = {"pivot": "byte_bpe", "sp-source": "sp_bpe", "char-source": "char"}


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
    for name, kind in DEMO_MODELS.items():
        folder = out / "models" / name
        if not (folder / "tokenizer.json").exists():
            build_tokenizer(kind, texts, vocab_size=600, chat_template=CHATML_JINJA, out_dir=folder)
    config = {
        "run_dir": str(out / "run"),
        "pivot": {"name": "pivot", "path": str(out / "models" / "pivot")},
        "sources": [{"name": n, "path": str(out / "models" / n)} for n in DEMO_MODELS if n != "pivot"],
        "data": {"paths": [str(p) for p in paths], "on_bad_record": "error"},
        "prepare": {"template": "openchat", "max_length": 160},
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
    rundir = RunDir(cfg.run_dir)
    console.rule("[bold]demo")
    for stage in STAGES:
        if available(stage):
            manifest = read_manifest(rundir.stage(stage)) or {}
            state = "complete" if manifest.get("complete") else "incomplete"
            console.print(f"  {stage:<10} {state:<11} {rundir.stage(stage)}")
        else:
            console.print(f"  {stage:<10} not built yet in this version")
