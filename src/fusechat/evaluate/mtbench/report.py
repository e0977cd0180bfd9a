"""MT-Bench tables in the paper's layout: a row per model; the categories, first turn, second turn, average.

``results.json`` holds both tables, ``results.md`` one Markdown table each,
``results.png`` a grouped bar chart with a panel each.

- Judged score: the mean rating (1 to 10) of the judgments with a rating;
  ``unrated`` counts those without one (no rating in the judgment, or a failed
  request), which are left out of the means, as FastChat's ``show_result.py``
  leaves them out. ``average`` is the mean over every rated judgment.
- Reference bits per byte: total bits over total bytes of the reference
  answers in the cell (categories without reference answers have no column).
"""

from __future__ import annotations

from pathlib import Path

from fusechat.evaluate.report import draw_bars, save_figure
from fusechat.rundir import atomic_write_json, atomic_write_text

SCORE = "mt_bench_score"
BITS = "reference_bits_per_byte"
TURN_COLUMNS = {1: "first_turn", 2: "second_turn"}
HEADERS = {"first_turn": "first turn", "second_turn": "second turn"}
UNRATED = "unrated"


def score_table(judgments: dict[tuple, dict], models: list[str], categories: list[str],
                category_of: dict) -> dict[str, dict]:
    """Per model: mean rating per category and turn, the average, and the count of unrated judgments."""
    table = {}
    for model in models:
        cells: dict[str, list] = {c: [] for c in [*categories, *TURN_COLUMNS.values(), "average"]}
        unrated = 0
        for (qid, who, turn), record in judgments.items():
            if who != model or qid not in category_of:
                continue
            if record["score"] == -1:
                unrated += 1
                continue
            for column in (category_of[qid], TURN_COLUMNS[turn], "average"):
                cells[column].append(record["score"])
        table[model] = {c: (sum(v) / len(v) if v else None) for c, v in cells.items()}
        table[model][UNRATED] = unrated
    return table


def bits_table(records: dict[str, list[dict]], categories: list[str]) -> dict[str, dict]:
    """Per model: bits per byte of the reference answers per category (those with references), turn, overall."""
    present = [c for c in categories if any(r["category"] == c for recs in records.values() for r in recs)]
    table = {}
    for model, recs in records.items():
        groups = {c: [r for r in recs if r["category"] == c] for c in present}
        groups.update({col: [r for r in recs if r["turn"] == t] for t, col in TURN_COLUMNS.items()})
        groups["average"] = recs
        table[model] = {c: _ratio(rs) for c, rs in groups.items()}
    return table


def _ratio(records: list[dict]) -> float | None:
    records = [r for r in records if r["bits"] is not None]  # longer than the model's context: not scored
    n_bytes = sum(r["bytes"] for r in records)
    return sum(r["bits"] for r in records) / n_bytes if n_bytes else None


def _sections(results: dict) -> list[tuple[str, str, dict, int]]:
    """(key, heading, table, digits) of the tables present."""
    out = []
    if results.get(SCORE):
        out.append((SCORE, f"MT-Bench score, judged by {results.get('judge')} (1 to 10, higher is better)",
                    results[SCORE], 2))
    if results.get(BITS):
        reference = results.get("reference", "reference")
        out.append((BITS, f"Bits per byte of the {reference} reference answers (lower is better)", results[BITS], 3))
    return out


def _cell(value, digits: int) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def format_markdown(results: dict, title: str | None = None) -> str:
    parts = [f"# {title}\n"] if title else []
    for _, heading, table, digits in _sections(results):
        cols = list(next(iter(table.values())))
        lines = [f"## {heading}", "", "| model | " + " | ".join(HEADERS.get(c, c) for c in cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(_cell(row.get(c), digits) for c in cols) + " |"
                  for name, row in table.items()]
        parts.append("\n".join(lines) + "\n")
    if not _sections(results):
        parts.append("No scores yet.\n")
    return "\n".join(parts)


def write_report(results: dict, out_dir: Path, title: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", format_markdown(results, title))
    write_chart(results, out_dir / "results.png", title)


def write_chart(results: dict, path: Path, title: str) -> None:
    """One panel per table: a group of bars per column (one bar per model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sections = _sections(results)
    models = max((len(t) for _, _, t, _ in sections), default=1)
    fig = Figure(figsize=(max(7.0, 1.0 + 11 * (0.4 + 0.25 * models)), 3.8 * max(1, len(sections))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(sections)), 1, squeeze=False)[:, 0]
    for ax, (key, heading, table, digits) in zip(axes, sections):
        cols = [c for c in next(iter(table.values())) if c != UNRATED]
        draw_bars(ax, table, cols, digits)
        ax.set_xticks(range(len(cols)), [HEADERS.get(c, c) for c in cols], rotation=20)
        ax.set_xlim(-0.6, len(cols) - 0.4)
        if all(v is None for row in table.values() for c, v in row.items() if c != UNRATED):
            ax.text(0.5, 0.5, "no rated judgment", ha="center", va="center", transform=ax.transAxes)
        if key == SCORE:
            ax.set_ylim(0, 10.8)  # the judge's scale, fixed so runs compare at a glance
        else:
            ax.margins(y=0.15)
        ax.set_title(heading)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if not sections:
        axes[0].text(0.5, 0.5, "no scores yet", ha="center", va="center")
    save_figure(fig, path, title)
