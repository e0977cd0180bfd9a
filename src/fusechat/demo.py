"""``fusechat demo``: the whole pipeline on a zoo of tiny chat models, with no GPU and no hub.

The demo is ``configs/demo.yaml`` run by the pipeline like any config: its ``zoo:``
model entries build the zoo (once), its ``synthetic:`` section writes the fusion
mixture and the held-out items, then every stage runs and the table is printed.
``--out DIR`` moves every ``fusechat-demo/`` path of the config under DIR;
``--zoo micro`` swaps the models for the micro zoo (the pipeline in about a minute).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from fusechat.errors import FusechatError
from fusechat.evaluate.report import format_markdown, write_report
from fusechat.pipeline import load_run, run_all
from fusechat.progress import compact_console, console, print_result
from fusechat.zoo.catalog import DEMO_ZOOS, ZOOS

DEFAULT_OUT = "fusechat-demo"
LOG_NAME = "demo.log"


def demo_config_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        raise FusechatError(f"{path} not found: the demo runs from a source checkout of fusechat")
    return path


def write_config(out: Path, zoo: str = "demo") -> Path:
    """configs/demo.yaml with its ``fusechat-demo/`` paths under ``out`` and the models of ``zoo``; its path."""
    if zoo not in DEMO_ZOOS:
        raise FusechatError(f"unknown zoo {zoo!r}; choose one of {', '.join(DEMO_ZOOS)}")
    raw = yaml.safe_load(demo_config_path().read_text(encoding="utf-8"))

    def move(value):
        if value == DEFAULT_OUT:
            return str(out)
        if isinstance(value, str) and value.startswith(DEFAULT_OUT + "/"):
            return str(out / value[len(DEFAULT_OUT) + 1:])
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    raw = move(raw)
    if zoo != "demo":
        entries = [{"name": m.name, "zoo": f"{zoo}/{m.name}"} for m in ZOOS[zoo].models]
        raw["pivot"], raw["sources"] = entries[0], entries[1:]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_demo(out: Path = Path(DEFAULT_OUT), force: bool = False, zoo: str = "demo",
             overrides: list[str] | None = None, verbose: bool = False) -> dict:
    """Run the demo config under ``out``; returns the results (also in ``out/eval/results.*``).
    The console shows one line per stage and the table; the stages' own output goes to ``out/demo.log``
    (``verbose``: to the console)."""
    started = time.time()
    out = Path(out)
    config = write_config(out, zoo)
    console.print(f"demo run config: {config}")
    cfg = load_run(config, overrides)
    if verbose:
        run_all(cfg, force=force)
    else:
        console.print(f"each stage's output: {out / LOG_NAME}")
        with compact_console(out / LOG_NAME):
            run_all(cfg, force=force)
    results = json.loads((Path(cfg.run_dir) / "eval" / "results.json").read_text(encoding="utf-8"))
    results["elapsed_s"] = round(time.time() - started, 1)
    write_report(results, out / "eval", "fusechat demo: the zoo fused")
    print_result(format_markdown(results))
    console.print(f"demo: {out / 'eval' / 'results.md'} ({results['elapsed_s']:.0f} s)")
    return results
