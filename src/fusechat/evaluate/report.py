"""The evaluation report: ``results.json``, one Markdown table per metric, a grouped bar chart."""

from __future__ import annotations

import os
from pathlib import Path

from fusechat.evaluate.pipeline_report import format_pipeline
from fusechat.rundir import atomic_write_json, atomic_write_text

# metric key -> (heading, which way is better, digits shown)
METRICS = {
    "exact_match": ("Exact match", "higher is better", 3),
    "bits_per_byte": ("Bits per byte", "lower is better", 3),
}
FLOOR_ROW = "entropy floor"
MAX_LABELLED_BARS = 40  # beyond this the value labels overlap


def write_report(results: dict, out_dir: Path, title: str = "fusechat evaluation") -> None:
    """Write ``results.json`` (``results`` as given), ``results.md`` and ``results.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", format_markdown(results, title))
    write_chart(results, out_dir / "results.png", title)


def columns(table: dict[str, dict]) -> list[str]:
    """Skills in order of first appearance over the rows, then ``average``."""
    skills = dict.fromkeys(k for row in table.values() for k in row if k != "average")
    return [*skills, "average"]


def _cell(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown(results: dict, title: str | None = None) -> str:
    """One table per metric present in ``results``: rows = models, columns = skills + average."""
    parts = [f"# {title}\n"] if title else []
    floor = results.get("entropy_floor") or {}
    for key, (heading, better, digits) in METRICS.items():
        table = results.get(key)
        if not table:
            continue
        cols = columns(table)
        rows = dict(table)
        if key == "bits_per_byte" and floor:
            rows[FLOOR_ROW] = {**floor, "average": _floor_average(floor, cols)}
        lines = [f"## {heading} ({better})", "", "| model | " + " | ".join(cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(_cell(row.get(c), digits) for c in cols) + " |"
                  for name, row in rows.items()]
        parts.append("\n".join(lines) + "\n")
    if results.get("row_notes"):
        parts.append("## Rows\n\n" + "\n".join(f"- `{name}`: {note}" for name, note in results["row_notes"].items())
                     + "\n")
    if results.get("retention"):
        parts.append(format_retention(results["retention"], results.get("merge_method")))
    if results.get("pipeline"):
        parts.append(format_pipeline(results["pipeline"]))
    return "\n".join(parts)


def format_retention(retention: dict[str, dict[str, float | None]], run_merge: str | None) -> str:
    """Each merge's share of each target's gain on its source's skills (1 = all of it)."""
    sources = list(dict.fromkeys(s for row in retention.values() for s in row))
    lines = ["## What each merge keeps of each target's gain (on its source's skills; 1 = all of it)", "",
             "| merge | " + " | ".join(sources) + " |", "|---|" + "---:|" * len(sources)]
    for merge, row in retention.items():
        label = f"{merge} (the run's merge)" if merge == run_merge else merge
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(s), 2) for s in sources) + " |")
    return "\n".join(lines) + "\n"


def _floor_average(floor: dict, cols: list[str]) -> float | None:
    """The floor's mean over the table's skills, when it has them all."""
    skills = [c for c in cols if c != "average"]
    if not skills or any(floor.get(s) is None for s in skills):
        return None
    return sum(floor[s] for s in skills) / len(skills)


def write_chart(results: dict, path: Path, title: str) -> None:
    """With an SFT row: each model against SFT per skill, as heatmaps (did fusion help?). Without one: a
    grouped bar chart, one panel per metric, a group per skill (and the average), a bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if any(REFERENCE_ROW in (results.get(key) or {}) for key in METRICS):
        return write_heatmaps(results, path, title)
    panels = [(key, results[key]) for key in METRICS if results.get(key)]
    widest = max((len(columns(t)) for _, t in panels), default=1)
    models = max((len(t) for _, t in panels), default=1)
    fig = Figure(figsize=(max(6.0, 1.0 + widest * (0.4 + 0.25 * models)), 3.6 * max(1, len(panels))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, (key, table) in zip(axes, panels):
        floor = (results.get("entropy_floor") or {}) if key == "bits_per_byte" else {}
        _draw_panel(ax, key, table, floor)
    if not panels:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
    save_figure(fig, path, title)


REFERENCE_ROW = "sft"


def write_heatmaps(results: dict, path: Path, title: str) -> None:
    """One heatmap per metric: rows = models, columns = skills + average, each cell the model minus SFT,
    blue where the model is better than SFT, red where it is worse, the difference written in the cell."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(key, results[key]) for key in METRICS if REFERENCE_ROW in (results.get(key) or {})]
    widest = max(len(columns(t)) for _, t in panels)
    tallest = max(len(t) - 1 for _, t in panels)
    fig = Figure(figsize=(2.5 + 0.9 * widest, (1.2 + 0.32 * tallest) * len(panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (key, table) in zip(axes, panels):
        heading, better, digits = METRICS[key]
        cols = columns(table)
        ref = table[REFERENCE_ROW]
        names = [n for n in table if n != REFERENCE_ROW]
        diff = np.array([[np.nan if table[n].get(c) is None or ref.get(c) is None else table[n][c] - ref[c]
                          for c in cols] for n in names], dtype=float)
        # Colour: the difference relative to SFT's value, capped at ±25 %, so that a target's few percent
        # show beside a source's tenfold; blue always means better (lower bits, higher exact match).
        ref_row = np.array([np.nan if ref.get(c) is None else abs(ref[c]) for c in cols], dtype=float)
        relative = diff / np.where(ref_row > 0, ref_row, 1.0)
        better_sign = -1.0 if key == "bits_per_byte" else 1.0
        ax.imshow(np.clip(better_sign * relative, -0.25, 0.25), cmap="RdBu", vmin=-0.25, vmax=0.25, aspect="auto")
        for i in range(len(names)):
            for j in range(len(cols)):
                if np.isfinite(diff[i, j]):
                    strong = abs(relative[i, j]) > 0.18
                    ax.text(j, i, f"{diff[i, j]:+.{digits}f}", ha="center", va="center", fontsize=7,
                            color="white" if strong else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{heading}: each model minus SFT (blue: better than SFT; colour saturates at 25 %)",
                     fontsize=9)
    save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, layout, and an atomic PNG write."""
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def draw_bars(ax, table: dict[str, dict], cols: list[str], digits: int) -> None:
    """A group of bars per column, one bar per row of ``table`` (missing values leave a gap)."""
    width = 0.8 / max(1, len(table))
    for m, (name, row) in enumerate(table.items()):
        xs = [g + (m - (len(table) - 1) / 2) * width for g, c in enumerate(cols) if row.get(c) is not None]
        ys = [row[c] for c in cols if row.get(c) is not None]
        bars = ax.bar(xs, ys, width=width, label=name)
        if len(table) * len(cols) <= MAX_LABELLED_BARS:
            ax.bar_label(bars, fmt=f"%.{digits}f", fontsize="x-small", padding=1)


def _draw_panel(ax, key: str, table: dict[str, dict], floor: dict) -> None:
    heading, better, digits = METRICS[key]
    cols = columns(table)
    draw_bars(ax, table, cols, digits)
    drawn = [g for g, c in enumerate(cols) if floor.get(c) is not None]
    for g in drawn:
        ax.hlines(floor[cols[g]], g - 0.45, g + 0.45, colors="black", linestyles="dashed",
                  label=FLOOR_ROW if g == drawn[0] else None)
    ax.set_xticks(range(len(cols)), cols)
    if key == "exact_match":
        ax.set_ylim(0, 1.15)  # a share: keep the scale fixed so runs compare at a glance
    else:
        ax.margins(y=0.15)
    ax.set_title(f"{heading} ({better})")
    if len(cols) == 1:
        ax.text(0.5, 0.5, "no items of this kind", ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
