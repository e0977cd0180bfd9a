"""Loading the run's tokenizers (and later models) from a ``ModelSpec``, with clear errors."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from fusechat.config import HUB_ID_RE, HUB_PREFIX, IMPLICIT_SFT, SFT, ModelSpec, RunConfig
from fusechat.errors import FusechatError
from fusechat.rundir import RunDir


def model_path_problem(path: str, hub: bool = False) -> str | None:
    """Why a model `path` cannot be loaded, or None.

    A path is a local folder unless the user says it is a hub id (``hub`` or a ``hub:`` prefix):
    a missing folder is never taken for a hub id, so no download happens by accident. A local
    folder must hold a model: its config.json and safetensors weights (``weights_problem``).
    """
    if path.startswith(HUB_PREFIX):
        path, hub = path[len(HUB_PREFIX):], True
    if hub:
        return None if HUB_ID_RE.match(path) else f"{path!r} is not a hub id (org/name)"
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            return f"{path} has no config.json; it is not a Hugging Face model folder"
        return weights_problem(Path(path))
    if Path(path).exists():
        return f"{path} is a file; a model is a folder"
    hint = ""
    if "/" in path and HUB_ID_RE.match(path):
        hint = f" (if {path!r} is a Hugging Face hub id, set `hub: true` or write hub:{path})"
    return f"folder not found: {path}{hint}"


SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weights_problem(folder: Path) -> str | None:
    """Why the weights of a local model folder cannot be loaded safely, or None.

    fusechat loads safetensors only, and transformers opens exactly these: ``model.safetensors``,
    or every file a ``model.safetensors.index.json`` lists. An index may list any file name, a
    pickled checkpoint included (which transformers would then unpickle), so each listed shard must
    be a ``.safetensors`` file beside the index.
    """
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
            shards = sorted(set(content["weight_map"].values()))
            assert isinstance(content["metadata"], dict)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, AssertionError):
            return (f"{index} is not a safetensors index (a JSON object with `metadata` and a `weight_map` of "
                    "tensor → file)")
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                return (f"{index} lists {shard!r} as a weights file; fusechat loads only .safetensors files beside "
                        "the index (a pickled checkpoint is never loaded)")
            if not (folder / shard).is_file():
                return f"{index} lists {shard}, which is not in {folder}"
        return None
    if (folder / SAFETENSORS).is_file():
        return None
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        return (f"{folder} holds only pickled weights ({', '.join(pickled)}); fusechat loads safetensors only. "
                "Convert once with transformers: from_pretrained(...).save_pretrained(..., safe_serialization=True) "
                "in an environment you trust.")
    return f"{folder} holds no weights ({SAFETENSORS} or {SAFETENSORS_INDEX})"


def reward_model_problem(folder: str) -> str | None:
    """Why ``folder`` is not a reward model fusechat can use (a sequence classifier with one label), or None."""
    config_file = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        return f"reward model folder not found: {folder}"
    if not config_file.is_file():
        return f"{folder} has no config.json; it is not a Hugging Face model folder"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{config_file} is not valid JSON ({e})"
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return (f"{folder} is not a sequence classifier (config.json architectures: {archs or 'none'}); "
                "implicit.score.reward_model needs a *ForSequenceClassification model with one label")
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    if labels != 1:
        return f"{folder} is a sequence classifier with {labels} labels; a reward model has one (num_labels: 1)"
    return None


def load_tokenizer(spec: ModelSpec):
    """The model's fast tokenizer. Fast tokenizers are required: stages need character offsets."""
    from transformers import AutoTokenizer

    problem = model_path_problem(spec.path, spec.hub)
    if problem:
        raise FusechatError(f"model {spec.name!r}: {problem}")
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError by case; the user needs which model
        raise FusechatError(f"model {spec.name!r}: cannot load a tokenizer from {spec.path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise FusechatError(
            f"model {spec.name!r}: the tokenizer at {spec.path} is not a fast (Rust) tokenizer; "
            "fusechat needs character offsets, which only fast tokenizers give"
        )
    return tok


def tokenizer_hash(tok) -> str:
    """Identity of a tokenizer: vocabulary, merges, normalisation, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps({k: str(v) for k, v in tok.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(str(getattr(tok, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_weights(spec: ModelSpec) -> None:
    """A local model folder must hold a config and safetensors weights (``weights_problem``): fusechat never
    unpickles a checkpoint."""
    folder = Path(spec.path)
    if not folder.is_dir():
        return  # a hub id: transformers fetches safetensors (use_safetensors=True)
    if not (folder / "config.json").is_file():
        raise FusechatError(f"model {spec.name!r}: {folder} has no config.json; it is not a Hugging Face model folder")
    problem = weights_problem(folder)
    if problem:
        raise FusechatError(f"model {spec.name!r}: {problem}")


def load_causal_lm(spec: ModelSpec, dtype: str = "fp32", device_map=None):
    """The model in eval mode, from safetensors, or a clear error naming the model."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # fusechat shows its own progress

    problem = model_path_problem(spec.path, spec.hub)
    if problem:
        raise FusechatError(f"model {spec.name!r}: {problem}")
    check_weights(spec)
    try:
        config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise FusechatError(f"model {spec.name!r}: cannot read the model config at {spec.path}: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            dtype=getattr(torch, TORCH_DTYPES[dtype]),
            device_map=device_map,
            use_safetensors=True,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
            raise FusechatError(f"model {spec.name!r}: {spec.path} ({arch}) is not a causal language model") from None
        raise FusechatError(f"model {spec.name!r}: cannot load {spec.path}: {e}") from None
    except OSError as e:
        raise FusechatError(f"model {spec.name!r}: cannot load {spec.path}: {e}") from None
    model.eval()
    return model


def model_hash(spec: ModelSpec) -> str:
    """What a model is, for the stages that cache what they compute from it.

    A local folder: its config.json and each top-level file's name, size and modification time, so
    weights retrained into the same folder (an unchanged config) read as another model and nothing
    computed from the old ones is reused. A hub id: its path and revision.
    """
    from pathlib import Path

    folder = Path(spec.path)
    config = folder / "config.json"
    if not config.is_file():
        return hashlib.sha256(f"{spec.path}@{spec.revision}".encode()).hexdigest()[:16]
    h = hashlib.sha256(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def device_map_for(device: str, setting: str = "device", processes: int = 1, process_device=None):
    """Where to load a model for a configured choice: ``cpu``, ``cuda`` or ``auto`` (a GPU if there is one).

    One process with several GPUs and ``auto`` spreads the model over them (``"auto"``);
    under ``accelerate launch`` each process uses its own ``process_device``.
    """
    import torch

    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if device == "cuda":
            raise FusechatError(f"{setting} is cuda but no CUDA GPU is visible here; use cpu or auto")
        return "cpu"
    if device == "auto" and processes == 1 and torch.cuda.device_count() > 1:
        return "auto"
    return str(process_device) if process_device is not None else "cuda"


def row_spec(name: str, path: str) -> ModelSpec:
    """A ModelSpec for any table row name (the name only labels messages)."""
    return ModelSpec(name=re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "model", path=str(path))


def free_memory() -> None:
    """Hand a dropped model's memory back (GPU caches included) before the next model loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_model(name: str, path: str, work: Callable, dtype: str = "fp32", device: str = "cpu",
               setting: str = "device"):
    """``work(model, tokenizer)`` on the folder at ``path`` in eval mode; the model's memory is freed after."""
    spec = row_spec(name, path)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, dtype, device_map_for(device, setting))
    try:
        model.eval()
        return work(model, tokenizer)
    finally:
        del model  # the only reference: the memory goes back before the next model loads
        free_memory()


def start_spec(cfg: RunConfig, name: str | None = None) -> ModelSpec:
    """The model target ``name`` starts from (and merges take as their base, with no name): the pivot, or with
    `train.start: implicit-sft` the implicit route's implicit-sft for the fused targets and Multi (SFT on the gold
    and implicit-sft itself start from the pivot)."""
    if cfg.train.start == IMPLICIT_SFT and name not in (SFT, IMPLICIT_SFT):
        return row_spec(IMPLICIT_SFT, str(RunDir(cfg.run_dir).stage("train", IMPLICIT_SFT)))
    return cfg.pivot
