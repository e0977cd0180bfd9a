"""Stage 6, merge: the targets in parameter space, tensor by tensor, into ``<run_dir>/merged/<method>/``.

The pivot's and every target's safetensors are read one tensor at a time and the
result is streamed into sharded safetensors, so peak memory is about one tensor
per input plus the output tensor, not whole models. Each merged folder is a
Hugging Face model: weights, config, tokenizer and chat template (from the first
target), ``merge_weights.json`` (VaRM / SCE weights per tensor), a model card.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from fusechat.config import GOLD, RunConfig, stable_hash
from fusechat.errors import FusechatError
from fusechat.merge.analysis import write_analysis
from fusechat.merge.methods import mean_variation, varm_weights, weighted_sum
from fusechat.merge.registry import MergeMethod, merge_method_named
from fusechat.merge.tensors_io import DTYPES, ModelReader, StreamingWriter, layer_key
from fusechat.model_loading import start_spec
from fusechat.progress import console, progress_bar
from fusechat.rundir import RunDir, build_output, is_complete, read_manifest

CHUNK_ELEMENTS = 1 << 20  # VaRM reads tensors larger than this (4 MiB in fp32) a block of rows at a time
WEIGHT_FILES = re.compile(r"(\.safetensors$|^model\.safetensors\.index\.json$|^manifest\.json$|^README\.md$)")


def merge_targets(cfg: RunConfig) -> list[str]:
    return cfg.merge.targets or [s.name for s in cfg.sources]


def model_folder(path: str, label: str) -> Path:
    """A local folder, or the cached snapshot of a hub id."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as e:
        raise FusechatError(f"{label}: cannot find the model {path}: {e}") from None


class Inputs:
    """The pivot and the targets, checked to be the same architecture tensor by tensor."""

    def __init__(self, cfg: RunConfig, names: list[str] | None = None):
        rundir = RunDir(cfg.run_dir)
        self.names = names or merge_targets(cfg)
        if len(self.names) < 2:
            raise FusechatError(f"merging needs at least two targets, got {self.names}")
        self.target_dirs = []
        self.fingerprints = []
        for name in self.names:
            folder = rundir.stage("train", name)
            manifest = read_manifest(folder)
            if not manifest or not manifest.get("complete"):
                raise FusechatError(f"{folder} holds no complete target; run `fusechat train CONFIG --source {name}`")
            self.target_dirs.append(folder)
            self.fingerprints.append(manifest["fingerprint"])
        base = start_spec(cfg)  # what the targets started from: the pivot, or implicit-sft (train.start)
        label = f"pivot {cfg.pivot.name!r}" if base is cfg.pivot else f"the targets' start {base.name!r}"
        self.base_path = base.path
        self.pivot_dir = model_folder(base.path, label)
        self.pivot = ModelReader(self.pivot_dir, label)
        self.targets = [ModelReader(d, f"target {n!r}") for d, n in zip(self.target_dirs, self.names)]
        self._check()

    def _check(self) -> None:
        arch = _architectures(self.pivot_dir)
        for reader, name in zip(self.targets, self.names):
            if _architectures(reader.folder) != arch:
                raise FusechatError(f"target {name!r} is a {_architectures(reader.folder)}, the pivot a {arch}")
            missing = sorted(set(self.pivot.tensors) - set(reader.tensors))
            extra = sorted(set(reader.tensors) - set(self.pivot.tensors))
            if missing or extra:
                which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the pivot lacks"
                raise FusechatError(f"target {name!r} {which} ({len(missing)} missing, {len(extra)} extra tensors)")
            for tname, info in self.pivot.tensors.items():
                other = reader.tensors[tname]
                if other.shape != info.shape or other.dtype != info.dtype:
                    raise FusechatError(
                        f"tensor {tname}: the pivot has {list(info.shape)} {info.dtype}, target {name!r} has "
                        f"{list(other.shape)} {other.dtype}"
                    )

    def tensors(self, name: str, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.pivot.get(name, rows), [t.get(name, rows) for t in self.targets]

    def blocks(self, name: str):
        """(pivot, targets) of a tensor, whole or a block of rows at a time when it is large."""
        for rows in self.pivot.row_chunks(name, CHUNK_ELEMENTS) or [None]:
            yield self.tensors(name, rows)

    def variations(self, name: str, kind: str) -> tuple[list[float], int]:
        """Each target's mean squared (or absolute) change of a tensor, read block by block, and its size."""
        sums, numel = None, 0
        for pivot, targets in self.blocks(name):
            n = pivot.numel()
            stats = [mean_variation(t.float() - pivot.float(), kind) * n for t in targets]
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
            numel += n
        return [s / max(numel, 1) for s in sums], numel

    def close(self) -> None:
        for r in (self.pivot, *self.targets):
            r.close()


def _architectures(folder: Path) -> list[str]:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("architectures", []) if config.is_file() else []


def run(cfg: RunConfig, force: bool = False, analyze: bool = False) -> list[Path]:
    inputs = Inputs(cfg)
    try:
        methods = list(dict.fromkeys([cfg.merge.method, *cfg.merge.baselines]))
        outs = [merge_one(cfg, inputs, method, force) for method in methods]
        if analyze:
            outs.append(write_analysis(cfg, inputs))
    finally:
        inputs.close()
    if len(cfg.gold_targets()) > 1:  # the GOLD baseline's targets, merged as the run's targets are
        gold = Inputs(cfg, cfg.gold_targets())
        try:
            outs.append(merge_one(cfg, gold, cfg.merge.method, force, folder=GOLD))
        finally:
            gold.close()
    return outs


def group_weights(inputs: Inputs, kind: str, granularity: str) -> dict[str, list[float]]:
    """VaRM weights per layer or for the whole model: variation pooled over the group's elements."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for name in inputs.pivot.names:
        if not _is_float(inputs.pivot.tensors[name].dtype):
            continue
        group = layer_key(name) if granularity == "layer" else "model"
        means, n = inputs.variations(name, kind)
        sums[group] = [a + m * n for a, m in zip(sums.get(group, [0.0] * len(means)), means)]
        counts[group] = counts.get(group, 0) + n
    return {g: varm_weights([s / counts[g] for s in v]) for g, v in sums.items()}


def merge_one(cfg: RunConfig, inputs: Inputs, name: str, force: bool = False, folder: str | None = None) -> Path:
    """Merge ``inputs`` with the method ``name`` into ``merged/<folder or name>/``."""
    try:
        method = merge_method_named(name)
        settings = method.settings(cfg.merge.params.get(name) or {}, len(inputs.targets))
    except ValueError as e:
        raise FusechatError(str(e)) from None
    out = RunDir(cfg.run_dir).stage("merge", folder or name)
    payload = {"pivot": inputs.base_path, "targets": inputs.fingerprints, "method": name, "settings": settings,
               "seed": cfg.merge.seed}
    fingerprint = stable_hash(payload)
    if is_complete(out, fingerprint, force, label=f"merge {name}"):
        return out

    tensor_names = inputs.pivot.names
    groups = None
    if method.delta_weighted and settings["granularity"] != "matrix":
        groups = group_weights(inputs, settings["variation"], settings["granularity"])
    plan = [(n, DTYPES[inputs.pivot.tensors[n].dtype], inputs.pivot.tensors[n].shape) for n in tensor_names]
    used_weights: dict[str, list[float]] = {}
    moved = [False] * len(inputs.targets)
    with build_output(out, "merge", fingerprint, method=name, pivot=inputs.base_path, targets=inputs.names,
                      target_fingerprints=dict(zip(inputs.names, inputs.fingerprints)),
                      settings=settings, seed=cfg.merge.seed) as building, progress_bar() as bar:
        writer = StreamingWriter(building.folder, plan, int(cfg.merge.max_shard_size_mb * 2**20),
                                 metadata={"fusechat_merge": name})
        task = bar.add_task(f"merge {name}", total=len(tensor_names))
        for i, tensor in enumerate(tensor_names):
            if method.delta_weighted and _is_float(inputs.pivot.tensors[tensor].dtype):
                # Elementwise given the weights: stream it a block of rows at a time.
                if groups is not None:
                    weights = groups["model" if settings["granularity"] == "model" else layer_key(tensor)]
                else:
                    means, _ = inputs.variations(tensor, settings["variation"])
                    weights = varm_weights(means)
                for pivot, targets in inputs.blocks(tensor):
                    for j, t in enumerate(targets):
                        moved[j] = moved[j] or not torch.equal(t, pivot)
                    writer.write(tensor, weighted_sum(targets, weights, pivot.dtype), part=True)
                used_weights[tensor] = [round(w, 6) for w in weights]
                bar.advance(task)
                continue
            pivot, targets = inputs.tensors(tensor)
            if not pivot.is_floating_point():
                if any(not torch.equal(pivot, t) for t in targets):
                    raise FusechatError(f"tensor {tensor} is not floating point and differs between the models")
                merged = pivot
            else:
                for j, t in enumerate(targets):
                    moved[j] = moved[j] or not torch.equal(t, pivot)
                torch.manual_seed(cfg.merge.seed + i)  # random methods (DARE's drops): reproducible per tensor
                result = method.merge(pivot, targets, **settings)
                merged = result.tensor.to(pivot.dtype)
                if result.weights is not None:
                    used_weights[tensor] = [round(w, 6) for w in result.weights]
            writer.write(tensor, merged)
            del pivot, targets, merged
            bar.advance(task)
        writer.close()
        _copy_model_files(inputs.target_dirs[0], building.folder)
        warnings = [f"target {n!r} equals the pivot: it adds nothing to the merge"
                    for n, m in zip(inputs.names, moved) if not m]
        for w in warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")
        if used_weights:
            # Inside the folder build_output renames into place whole: plain writes are enough.
            (building.folder / "merge_weights.json").write_text(
                json.dumps({"targets": inputs.names, "weights": used_weights}, indent=2) + "\n", encoding="utf-8")
        summary = _weight_summary(used_weights, inputs.names)
        (building.folder / "README.md").write_text(model_card(cfg, method, settings, inputs, summary), encoding="utf-8")
        building.manifest.update(weights_summary=summary, warnings=warnings, output_files=writer.files)
    console.print(f"merge {name}: {out}" + (f" (mean weights {summary['mean']})" if summary else ""))
    return out


def _is_float(dtype_name: str) -> bool:
    return dtype_name in ("F64", "F32", "F16", "BF16")


def _copy_model_files(source: Path, dest: Path) -> None:
    """Config, generation config, tokenizer and chat template of a target."""
    for f in source.iterdir():
        if f.is_file() and not WEIGHT_FILES.search(f.name):
            shutil.copyfile(f, dest / f.name)


def _weight_summary(weights: dict[str, list[float]], names: list[str]) -> dict:
    if not weights:
        return {}
    columns = list(zip(*weights.values()))
    return {
        "mean": {n: round(sum(c) / len(c), 4) for n, c in zip(names, columns)},
        "min": {n: round(min(c), 4) for n, c in zip(names, columns)},
        "max": {n: round(max(c), 4) for n, c in zip(names, columns)},
    }


def model_card(cfg: RunConfig, method: MergeMethod, settings: dict, inputs: Inputs, summary: dict) -> str:
    code = "fusechat's implementation" if method.implementation == "fusechat" else "mergekit's implementation"
    how = f"{method.title} ({code}{', ' + method.paper if method.paper else ''})"
    rows = "\n".join(f"| {n} | `{d}` | {summary.get('mean', {}).get(n, '-')} | {summary.get('min', {}).get(n, '-')} | "
                     f"{summary.get('max', {}).get(n, '-')} |" for n, d in zip(inputs.names, inputs.target_dirs))
    return f"""---
library_name: transformers
tags: [fusechat, merge, {method.name}]
base_model: {cfg.pivot.path}
---
# FuseChat merge: {method.name}

Merged by fusechat with {how}.

Pivot: `{cfg.pivot.path}`.

| target | folder | mean weight | min | max |
|---|---|---|---|---|
{rows}

Per-tensor weights: `merge_weights.json` (for methods with per-target weights, such as VaRM and SCE).
Settings: {json.dumps(settings)}.
"""
