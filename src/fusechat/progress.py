"""Console output shared by the stages: one rich console, progress bars, a summary table, and a compact
mode (one line per stage on the screen, the stages' own output in a log file)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)


def print_result(text: str) -> None:
    """A result (a results table) on stdout as plain text, never wrapped, so that `> file` and pipes get it whole;
    progress and messages stay on stderr (``console``)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def progress_bar(*extra_columns) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


# Compact mode: one live line per stage on the screen, every stage's own output in a log file.
_compact: dict = {}


@contextmanager
def compact_console(log_path: Path):
    """While active, ``console``, stdout and stderr go to ``log_path`` and each ``stage_line`` shows one
    line on the screen; on an error the log's last lines are shown with its path."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    screen = Console(file=sys.stderr, highlight=False)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        saved_file = console._file  # None: follow sys.stderr, as before
        console.file = log
        _compact.update(screen=screen, detail="")
        try:
            with redirect_stdout(log), redirect_stderr(log):
                yield screen
        except BaseException:
            log.flush()
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            screen.print("\n".join(tail), markup=False, highlight=False)
            screen.print(f"[red]stopped[/red]: the whole log is in {log_path}")
            raise
        finally:
            console._file = saved_file
            _compact.clear()


def compact_active() -> bool:
    return bool(_compact)


@contextmanager
def stage_line(stage: str):
    """A stage's heading: in compact mode one live line (spinner, detail, elapsed), then a ✓ line with its
    time; otherwise a rule."""
    if not _compact:
        console.rule(f"[bold]{stage}")
        yield
        return
    screen: Console = _compact["screen"]
    started = time.time()
    _compact["detail"] = ""
    console.rule(f"[bold]{stage}")  # into the log, so that it reads like a verbose run

    def line() -> Text:
        text = Text.assemble((f"{stage:<10}", "bold"), f"{time.time() - started:6.0f} s  ")
        return text.append(_compact.get("detail", ""), style="dim")

    spinner = Spinner("dots")

    def current() -> Spinner:
        spinner.update(text=line())
        return spinner

    with Live(get_renderable=current, console=screen, transient=True, refresh_per_second=4,
              redirect_stdout=False, redirect_stderr=False):
        yield
    screen.print(Text.assemble(("✓ ", "green"), (f"{stage:<10}", "bold"), f"{time.time() - started:6.0f} s"))


def stage_detail(text: str) -> None:
    """What the current stage is doing, for its compact line (ignored otherwise)."""
    if _compact:
        _compact["detail"] = _compact.get("prefix", "") + text


@contextmanager
def detail_prefix(prefix: str):
    """Put ``prefix`` before every stage detail inside the block (e.g. which zoo model is being built)."""
    if not _compact:
        yield
        return
    _compact["prefix"] = prefix
    stage_detail("")
    try:
        yield
    finally:
        _compact.pop("prefix", None)
