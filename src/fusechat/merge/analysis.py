"""``fusechat merge --analyze``: VaRM weights per matrix and variation per layer, as JSON and a heatmap."""

from __future__ import annotations

from pathlib import Path

from fusechat.config import RunConfig
from fusechat.merge.methods import varm_weights
from fusechat.merge.registry import merge_method_named
from fusechat.merge.tensors_io import layer_key, module_type
from fusechat.progress import console
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
