"""A hostile or unlucky user: a pickle behind a safetensors index, a run folder that cannot be written, a chat
template that reaches out of its sandbox, paths and step counts that make no sense, a model folder that is
empty. Each ends in one clear message, with nothing half-written and nothing unpickled."""

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import sharegpt, write_jsonl

from fusechat.config import GGUFSource, ModelSpec, load_config
from fusechat.errors import ConfigError, FusechatError
from fusechat.model_loading import load_causal_lm, load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


def cli(*argv):
    from fusechat.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


# ------------------------------------------------------------------ 1. a pickle behind a safetensors index


class Touch:
    """Unpickling this creates a file: proof that a checkpoint was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def pickled_model(folder: Path, tokenizer_dir: Path, marker: Path) -> Path:
    """A model folder whose safetensors index sends the loader to a malicious pickle, with an empty decoy."""
    shutil.copytree(tokenizer_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    payload = pickle.dumps({"model.embed_tokens.weight": Touch(marker)})
    pickle.loads(payload)  # the payload is live: unpickled, it touches the marker
    assert marker.exists()
    marker.unlink()
    (folder / "pytorch_model.bin").write_bytes(payload)
    (folder / "decoy.safetensors").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "pytorch_model.bin"}}))
    return folder


def test_a_pickle_behind_a_safetensors_index_is_refused_unread(tmp_path, tokenizer_dirs):
    marker = tmp_path / "unpickled"
    folder = pickled_model(tmp_path / "evil", tokenizer_dirs["byte_bpe"], marker)
    with pytest.raises(FusechatError, match=r"lists 'pytorch_model.bin' as a weights file; fusechat loads only "
                                            r"\.safetensors files"):
        load_causal_lm(ModelSpec(name="evil", path=str(folder)))
    assert not marker.exists()


def test_an_index_must_list_safetensors_files_that_are_there(tmp_path, tokenizer_dirs):
    folder = tmp_path / "m"
    shutil.copytree(tokenizer_dirs["byte_bpe"], folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = folder / "model.safetensors.index.json"
    for weight_map, problem in [({"w": "../model-00001-of-00001.safetensors"}, "as a weights file"),
                                ({"w": "model-00002-of-00002.safetensors"}, "which is not in"),
                                ("nope", "is not a safetensors index")]:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(FusechatError, match=problem):
            load_causal_lm(ModelSpec(name="m", path=str(folder)))
    tensors = json.loads((folder / "model-00001-of-00001.safetensors").read_bytes()[8:8 + int.from_bytes(
        (folder / "model-00001-of-00001.safetensors").read_bytes()[:8], "little")])
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors if name != "__metadata__"}
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    assert index.name == SAFE_WEIGHTS_INDEX_NAME  # the file transformers reads; the sharded model loads
    load_causal_lm(ModelSpec(name="m", path=str(folder)))


def test_a_folder_with_only_a_stray_safetensors_file_holds_no_weights(tmp_path, tokenizer_dirs):
    folder = tmp_path / "m"
    shutil.copytree(tokenizer_dirs["byte_bpe"], folder)
    (folder / "model.safetensors").rename(folder / "decoy.safetensors")
    with pytest.raises(FusechatError, match=r"holds no weights \(model.safetensors or model.safetensors.index.json\)"):
        load_causal_lm(ModelSpec(name="m", path=str(folder)))


# ------------------------------------------------------------------ 2. a run folder that cannot be written


def prepare_config(tmp_path: Path, tokenizer_dirs, conversations: int = 3) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl",
                       [sharegpt(f"hello there {i}, how are you?", f"I am fine, thanks {i}!") for i in range(conversations)])
    config = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "pivot", "path": str(tokenizer_dirs["byte_bpe"])},
              "sources": [{"name": "src", "path": str(tokenizer_dirs["sp_bpe"])}], "data": {"paths": [str(data)]}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_fusechat(args: list[str], preexec_fn=None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "fusechat", *args], capture_output=True, text=True,
                          env=env, preexec_fn=preexec_fn, timeout=300)


def clean_message(done: subprocess.CompletedProcess) -> str:
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    return output


def test_an_immutable_run_folder_stops_with_a_message_naming_it(tmp_path, tokenizer_dirs):
    config = prepare_config(tmp_path, tokenizer_dirs)
    run = tmp_path / "run"
    run.mkdir()
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system with immutable folders")
    try:
        output = clean_message(run_fusechat(["prepare", str(config)]))
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    assert f"cannot write in {run}: operation not permitted" in output
    assert "give the run a writable folder (`run_dir`, or `--set run_dir=DIR`)" in output
    assert os.listdir(run) == []


def test_a_read_only_mount_stops_with_a_message_naming_the_folder(tmp_path, tokenizer_dirs):
    config = prepare_config(tmp_path, tokenizer_dirs)
    run = tmp_path / "run"
    run.mkdir()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only bind mount needs root and unshare")
    # In a mount namespace of its own, so the mount goes with the process however the test ends.
    mount = f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && exec \"$@\""
    done = run_fusechat(["prepare", str(config)], prefix=["unshare", "-m", "sh", "-c", mount, "sh"])
    if "Operation not permitted" in done.stderr and "mount" in done.stderr:
        pytest.skip("mount namespaces are not allowed here")
    output = clean_message(done)
    assert f"cannot write in {run}: read-only file system" in output
    assert os.listdir(run) == []


def test_a_file_size_limit_stops_prepare_with_nothing_half_written(tmp_path, tokenizer_dirs):
    config = prepare_config(tmp_path, tokenizer_dirs, conversations=3000)
    limit = 64 * 1024  # the config and the lock file fit; the prepared rows do not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    output = clean_message(run_fusechat(["prepare", str(config)], preexec_fn=limited))
    run = tmp_path / "run"
    assert f"cannot write in {run / 'prepared'}: file too large" in output
    assert "free space (or raise the limit)" in output
    assert sorted(os.listdir(run)) == ["config.yaml", "fusechat.lock"]  # no prepared folder, no temporary


def test_a_disk_error_names_the_file_system_problem_only_for_those_errors():
    import errno

    from fusechat.errors import DiskError, disk_errno

    assert disk_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert disk_errno(OSError("[Errno 27] File too large")) == errno.EFBIG  # as Arrow raises it
    assert disk_errno(OSError(errno.ENOENT, "No such file")) is None
    assert disk_errno(ValueError("[Errno 28] not an OSError")) is None
    assert str(DiskError("/x/run", OSError(errno.ENOSPC, "no"))).startswith(
        "cannot write in /x/run: no space left on the device. Nothing half-written was left: free space")


# ------------------------------------------------------------------ 3. a chat template out of its sandbox


def sandbox_breaking_pivot(tmp_path: Path, tokenizer_dirs) -> Path:
    """The pivot with a chat template that reaches for Python's classes (jinja's sandbox refuses it)."""
    pivot = tmp_path / "pivot"
    shutil.copytree(tokenizer_dirs["byte_bpe"], pivot)
    settings = json.loads((pivot / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (pivot / "tokenizer_config.json").write_text(json.dumps(settings))
    (pivot / "chat_template.jinja").unlink(missing_ok=True)
    return pivot


def test_a_template_that_breaks_out_of_the_sandbox_says_why_and_what_to_use(tmp_path, tokenizer_dirs):
    from fusechat.data.conversations import Message
    from fusechat.data.templates import TemplateError, get_template

    pivot = sandbox_breaking_pivot(tmp_path, tokenizer_dirs)
    template = get_template("tokenizer", load_tokenizer(ModelSpec(name="p", path=str(pivot))))
    with pytest.raises(TemplateError, match=r"cannot render this conversation \(SecurityError: .*set prepare.template "
                                            r"to a built-in template \(openchat, chatml\)"):
        template.render([Message("user", "hi"), Message("assistant", "yo")], "</s>")


def test_prepare_reports_the_template_error_with_the_record(tmp_path, tokenizer_dirs, capsys):
    pivot = sandbox_breaking_pivot(tmp_path, tokenizer_dirs)
    config = prepare_config(tmp_path, tokenizer_dirs)
    assert cli("prepare", config, "--set", f"pivot.path={pivot}", "--set", "prepare.template=tokenizer") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'data.jsonl'}:1: the chat template of" in err and "SecurityError" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "prepared").exists()


# ------------------------------------------------------------------ 4. a GGUF file name that is a path


@pytest.mark.parametrize("name", ["..", ".", "/", "sub/model.gguf", "..\\model.gguf"])
def test_a_gguf_file_inside_wheels_must_be_a_plain_file_name(name):
    with pytest.raises(ValueError, match="must be the name of a file inside gguf.wheels"):
        GGUFSource(wheels=["tiny-model==1.0"], file=name)


@pytest.mark.parametrize("name", ["..", "../model.gguf", "/etc/model.gguf", "data/"])
def test_a_gguf_file_inside_a_package_stays_inside_it(name):
    with pytest.raises(ValueError, match="must name a file inside gguf.package"):
        GGUFSource(package="tinymodelpkg", file=name)
    assert GGUFSource(package="tinymodelpkg", file="data/model.gguf").file == "data/model.gguf"


# ------------------------------------------------------------------ 6. validation gaps


@pytest.mark.parametrize("value", [-2, 0])
def test_max_steps_is_positive_or_minus_one(tmp_path, tokenizer_dirs, value):
    config = prepare_config(tmp_path, tokenizer_dirs)
    for key in ("train.max_steps", "implicit.dpo.max_steps"):
        with pytest.raises(ConfigError, match=f"{key}: must be a positive number of steps, or -1 for no limit"):
            load_config(config, overrides=[f"{key}={value}"])
    assert load_config(config, overrides=["train.max_steps=-1"]).train.max_steps == -1


def test_an_empty_model_folder_is_not_ready_to_run(tmp_path, tokenizer_dirs, capsys):
    config = prepare_config(tmp_path, tokenizer_dirs)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("validate", config, "--set", f"sources.src.path={empty}") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"sources[0].path: {empty} has no config.json; it is not a Hugging Face model folder" in err
    assert "ready to run" not in err
    assert cli("represent", config, "--set", f"sources.src.path={empty}") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "has no config.json" in err and "sentencepiece" not in err
