"""``fusechat merge --analyze``: VaRM weights per matrix and variation per layer (JSON and a heatmap), and the
held-out loss along straight lines between the pivot and the targets (JSON and a picture)."""

from __future__ import annotations

from pathlib import Path

import torch

from fusechat.config import RunConfig
from fusechat.evaluate.items import load_items
from fusechat.generation import answer_bits
from fusechat.merge.methods import varm_weights
from fusechat.merge.registry import merge_method_named
from fusechat.merge.tensors_io import layer_key, module_type
from fusechat.model_loading import free_memory, load_causal_lm, load_tokenizer, row_spec
from fusechat.progress import console, progress_bar
from fusechat.rundir import RunDir, atomic_write_json


def write_analysis(cfg: RunConfig, inputs) -> Path:
    out = RunDir(cfg.run_dir).stage("merge", "analysis")
    out.mkdir(parents=True, exist_ok=True)
    kind = merge_method_named("varm").settings(cfg.merge.params.get("varm") or {}, len(inputs.targets))["variation"]
    per_matrix: dict[str, dict] = {}
    layer_sums: dict[str, list[float]] = {}
    layer_counts: dict[str, int] = {}
    for name in inputs.pivot.names:
        if inputs.pivot.tensors[name].dtype not in ("F64", "F32", "F16", "BF16"):
            continue
        v, n = inputs.variations(name, kind)
        per_matrix[name] = {"variation": v, "varm_weights": varm_weights(v)}
        group = layer_key(name)
        layer_sums[group] = [a + b * n for a, b in zip(layer_sums.get(group, [0.0] * len(v)), v)]
        layer_counts[group] = layer_counts.get(group, 0) + n
    per_layer = {g: [s / layer_counts[g] for s in sums] for g, sums in layer_sums.items()}
    atomic_write_json(out / "varm_weights.json", {"targets": inputs.names, "variation": kind, "matrices": per_matrix})
    atomic_write_json(out / "variation_per_layer.json", {"targets": inputs.names, "variation": kind, "layers": per_layer})
    heatmap(per_matrix, inputs.names, out / "varm_heatmap.png")
    write_path_losses(cfg, inputs, out)
    console.print(f"merge analysis: {out}")
    return out


def heatmap(per_matrix: dict[str, dict], targets: list[str], path: Path) -> None:
    """Layers × module types, one panel per target, coloured by its VaRM weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layered = {n: m for n, m in per_matrix.items() if layer_key(n).startswith("layer ")}
    layers = sorted({int(layer_key(n).split()[1]) for n in layered})
    modules = list(dict.fromkeys(module_type(n) for n in layered))
    if not layers or not modules:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(1.2 + 0.45 * len(modules) * len(targets), 1.5 + 0.3 * len(layers)),
                             squeeze=False)
    for j, (ax, target) in enumerate(zip(axes[0], targets)):
        grid = np.full((len(layers), len(modules)), np.nan)
        for n, m in layered.items():
            grid[layers.index(int(layer_key(n).split()[1])), modules.index(module_type(n))] = m["varm_weights"][j]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"VaRM weight: {target}")
        ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- loss along straight lines in weight space


def interpolated(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·start + α·end for every floating-point tensor (in fp32, cast back); the others from ``start``."""
    return {n: (t.float().lerp(end[n].float(), alpha).to(t.dtype) if t.is_floating_point() else t)
            for n, t in start.items()}


def path_losses(cfg: RunConfig, inputs, items: list, points: int = 5, batch_size: int = 16) -> dict:
    """Held-out bits per byte along pivot → each target and target → target, at ``points`` evenly spaced α.

    A barrier between two models shows as a bump above both ends; a line that stays low
    means the two sit in one basin and averaging them keeps what each knows.
    """
    states = {"pivot": inputs.pivot.state_dict()}
    states.update({name: reader.state_dict() for name, reader in zip(inputs.names, inputs.targets)})
    lines = [("pivot", n) for n in inputs.names]
    lines += [(a, b) for i, a in enumerate(inputs.names) for b in inputs.names[i + 1:]]
    alphas = [i / (points - 1) for i in range(points)]
    spec = row_spec("pivot", str(inputs.pivot_dir))
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, "fp32", "cpu")
    out: dict[str, list[float | None]] = {}
    try:
        with progress_bar() as bar:
            task = bar.add_task("merge analysis: loss along lines", total=len(lines) * points)
            for a, b in lines:
                losses = []
                for alpha in alphas:
                    model.load_state_dict(interpolated(states[a], states[b], alpha), strict=False)
                    scored = [(bits, n) for bits, n in answer_bits(model, tokenizer, items, batch_size)
                              if bits is not None]
                    total = sum(n for _, n in scored)
                    losses.append(round(sum(bits for bits, _ in scored) / total, 4) if total else None)
                    bar.advance(task)
                out[f"{a} → {b}"] = losses
    finally:
        del model
        free_memory()
    return {"alphas": alphas, "items": len(items), "lines": out}


def write_path_losses(cfg: RunConfig, inputs, folder: Path, max_items: int = 200) -> Path | None:
    """``path_losses.json`` and ``path_losses.png`` on (at most ``max_items`` of) the run's eval items."""
    if not cfg.eval.data:
        console.print("merge analysis: no eval.data, so no loss along the lines between the models")
        return None
    items = spread(items=[it for path in cfg.eval.data for it in load_items(path)], count=max_items)
    result = path_losses(cfg, inputs, items, batch_size=cfg.eval.batch_size)
    atomic_write_json(folder / "path_losses.json", result)
    path_picture(result, folder / "path_losses.png")
    return folder / "path_losses.json"


def spread(items: list, count: int) -> list:
    """At most ``count`` items taken evenly through the list: eval files are grouped by skill, and the first
    ``count`` would leave the last skills out."""
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


def path_picture(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, losses in result["lines"].items():
        ax.plot(result["alphas"], [float("nan") if v is None else v for v in losses], marker="o", label=label)
    ax.set_xlabel("α: (1 − α)·start + α·end")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("loss along straight lines between the models")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
