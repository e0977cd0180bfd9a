"""Shared fixtures: tiny tokenizers trained in the test session, data files, run configs.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is
imported, so an accidental download fails loudly.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import yaml

CORPUS = [
    "GPT4 Correct User: hello there, how are you?",
    "GPT4 Correct Assistant: I am fine, thanks! The weather is nice today.",
    "What is the capital of Zorvia? The capital of Zorvia is Mellport.",
    "Reverse the word planet. tenalp. Describe Tamaro, a small green heron.",
    "You are a helpful assistant. Hi! Hello, how can I help you today?",
]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """One model folder per tokenizer family: byte_bpe, sp_bpe, char (all with a ChatML chat template), each with
    the smallest Llama on top, for the stages that read only the tokenizer (a model is what a config names)."""
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import KINDS, build_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = root / kind
        tok = build_tokenizer(kind, CORPUS * 3, vocab_size=350, chat_template=CHATML_JINJA, out_dir=dirs[kind])
        build_model("llama", tok, out_dir=dirs[kind], hidden=8, layers=1, heads=2)
    return dirs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def sharegpt(*turns, **extra):
    roles = ["human", "gpt"]
    return {**extra, "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]}


def openai(*turns, **extra):
    roles = ["user", "assistant"]
    return {**extra, "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


@pytest.fixture
def make_config(tmp_path, tokenizer_dirs):
    """Write a run config for the given data files and return its path."""

    def make(data_paths, pivot="byte_bpe", **sections):
        cfg = {
            "run_dir": str(tmp_path / "run"),
            "pivot": {"name": "pivot", "path": str(tokenizer_dirs[pivot])},
            "sources": [{"name": "src", "path": str(tokenizer_dirs["sp_bpe"])}],
            "data": {"paths": [str(p) for p in data_paths]},
        }
        for key, value in sections.items():
            cfg.setdefault(key, {}).update(value)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    return make


# ------------------------------------------------------------------ a zoo of tiny models

CONVERSATIONS = [
    sharegpt("hello there, how are you?", "I am fine, thanks!", "The weather is nice today.", "Hello, how can I help?",
             id="a"),
    sharegpt("What is the capital of Zorvia?", "The capital of Zorvia is Mellport.", id="b"),
    sharegpt("Reverse the word planet.", "tenalp", id="c"),
    sharegpt("Describe Tamaro.", "Tamaro is a small green heron.", id="d"),
    sharegpt("Hi!", "Hello, how can I help you today?", id="e"),
]

# name -> (architecture, tokenizer family, tokenizer kwargs, model kwargs)
MODELS = {
    "llama": ("llama", "byte_bpe", {}, {}),
    "mistral": ("mistral", "sp_bpe", {"eos": "<|endoftext|>", "bos": None, "pad": "<pad>"}, {}),
    "mixtral": ("mixtral", "sp_bpe", {}, {}),
    "qwen2": ("qwen2", "byte_bpe", {"eos": "<|im_end|>", "bos": None}, {"vocab_padding": 37}),
    "gpt2": ("gpt2", "char", {"eos": "<|endoftext|>", "bos": None}, {"tie": True}),
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    texts = CORPUS * 3 + [t["value"] for c in CONVERSATIONS for t in c["conversations"]]
    dirs = {}
    for name, (arch, family, tok_kwargs, model_kwargs) in MODELS.items():
        tok = build_tokenizer(family, texts, vocab_size=400, **tok_kwargs)
        dirs[name] = root / name
        build_model(arch, tok, out_dir=dirs[name], seed=len(dirs), **model_kwargs)
    return dirs


def write_config(tmp_path, zoo, pivot="llama", sources=("mistral",), **sections):
    data = write_jsonl(tmp_path / "data.jsonl", CONVERSATIONS)
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "pivot": {"name": pivot, "path": str(zoo[pivot])},
        "sources": [{"name": s, "path": str(zoo[s])} for s in sources],
        "data": {"paths": [str(data)]},
        "represent": {"dtype": "fp32", "batch_size": 2, "shard_size": 2, **sections.pop("represent", {})},
        **sections,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path




def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when asked for: `python -m pytest -m slow`."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `python -m pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
