"""``fusechat demo``: the whole pipeline on the zoo of tiny chat models, with no GPU and no hub.

1. Build (or reuse) the zoo: a pivot and specialists of different architectures,
   tokenizers and sizes, trained here on their skills (``fusechat.zoo.build``).
2. Write the fusion mixture (every skill, a few hundred gold conversations each,
   none of them seen by the zoo) and the held-out evaluation items.
3. Run ``configs/demo.yaml`` with its paths moved under ``--out``: prepare,
   represent, align, fuse, one target per source, the SFT (λ = 1) and Multi
   baselines, every merge, and the evaluation.
4. Add the skills' entropy floors and which source holds which skill to the
   evaluation, and print the table (the analogue of the paper's Table 1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from fusechat.errors import FusechatError
from fusechat.progress import console
from fusechat.zoo.build import DEMO_ZOO, ZooSpec, build_zoo
from fusechat.zoo.skills import SKILLS, conversations, entropy_floor, eval_items

DEFAULT_OUT = "fusechat-demo"
MIXTURE_SEED = 10_000  # the fusion mixture's conversations are drawn apart from the zoo's training data


def demo_config_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        raise FusechatError(f"{path} not found: the demo runs from a source checkout of fusechat")
    return path


def write_data(out: Path, mixture_per_skill: int, eval_per_skill: int) -> tuple[Path, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    mixture, items = data / "mixture.jsonl", data / "eval.jsonl"
    _write_jsonl(mixture, [c for skill in SKILLS for c in conversations(skill, mixture_per_skill, MIXTURE_SEED,
                                                                           id_prefix="mix-")])
    _write_jsonl(items, [item for skill in SKILLS for item in eval_items(skill, eval_per_skill)])
    return mixture, items


def _write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:  # unchanged data keeps later stages complete
        path.write_text(text, encoding="utf-8")


def resolve_config(out: Path, spec: ZooSpec, zoo: dict[str, Path], overrides: dict | None = None) -> Path:
    """configs/demo.yaml with its paths under ``out`` and the models of ``spec``."""
    raw = yaml.safe_load(demo_config_path().read_text(encoding="utf-8"))

    def move(value):
        if isinstance(value, str) and value.startswith(DEFAULT_OUT + "/"):
            return str(out / value[len(DEFAULT_OUT) + 1:])
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    raw = move(raw)
    pivot, *sources = spec.models
    raw["pivot"] = {"name": pivot.name, "path": str(zoo[pivot.name])}
    raw["sources"] = [{"name": m.name, "path": str(zoo[m.name])} for m in sources]
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_demo(out: Path = Path(DEFAULT_OUT), force: bool = False, spec: ZooSpec = DEMO_ZOO,
             mixture_per_skill: int = 300, eval_per_skill: int = 60, overrides: dict | None = None) -> dict:
    from fusechat import align, fuse, merge, prepare, represent, train
    from fusechat.config import load_config
    from fusechat.evaluate import stage as evaluate
    from fusechat.evaluate.items import load_items
    from fusechat.evaluate.report import format_markdown, write_report
    from fusechat.rundir import RunDir

    started = time.time()
    out = Path(out)
    console.rule("[bold]zoo")
    zoo = build_zoo(out / "zoo", spec)
    _, items_path = write_data(out, mixture_per_skill, eval_per_skill)
    config = resolve_config(out, spec, zoo, overrides)
    cfg = load_config(config)
    RunDir(cfg.run_dir).save_config(cfg.to_yaml())
    console.print(f"demo run config: {config}")

    for name, stage in (("prepare", prepare), ("represent", represent), ("align", align), ("fuse", fuse)):
        console.rule(f"[bold]{name}")
        stage.run(cfg, force=force)
    console.rule("[bold]train")
    train.run(cfg, force=force)  # a target per source, then the SFT and Multi baselines (train.baselines)
    console.rule("[bold]merge")
    merge.run(cfg, force=force)
    console.rule("[bold]eval")
    eval_dir = evaluate.run(cfg, force=force)

    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    raw_items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines()]
    kinds = {it.skill: it.kind for it in load_items(items_path)}
    results["entropy_floor"] = {
        skill: round(entropy_floor(skill, [r for r in raw_items if r["skill"] == skill]), 4)
        for skill, kind in kinds.items() if kind == "distribution"
    }
    results["source_skills"] = {m.name: sorted(m.skills) for m in spec.models[1:]}
    results["elapsed_s"] = round(time.time() - started, 1)
    for folder in (eval_dir, out / "eval"):
        write_report(results, folder, "fusechat demo: the zoo fused")
    console.print(format_markdown(results))
    console.print(f"demo: {eval_dir / 'results.md'} ({results['elapsed_s']:.0f} s)")
    return results
