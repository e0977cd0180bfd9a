"""The ``synthetic`` section of a run config: the fusion mixture and held-out items of the synthetic skills,
written before the first stage.

The files are a pure function of the section, so writing them again changes
nothing and keeps every later stage complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusechat.config import RunConfig
from fusechat.rundir import atomic_write_text
from fusechat.synthetic.skills import ALL_SKILLS, conversations, eval_items, pool_prompts


def synthetic_problems(cfg: RunConfig) -> list[str]:
    """Config problems of the `synthetic` section that only the skills themselves can tell."""
    if cfg.synthetic is None:
        return []
    problems = []
    for field in ("train", "prompts"):
        unknown = [k for k in getattr(cfg.synthetic, field) if k not in ALL_SKILLS]
        if unknown:
            problems.append(f"synthetic.{field}: unknown skill(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(ALL_SKILLS)}")
    return problems


def ensure_synthetic(cfg: RunConfig) -> None:
    syn = cfg.synthetic
    if syn is None:
        return
    train, items = syn.files()
    _write_jsonl(train, [c for skill, n in syn.train.items()
                         for c in conversations(skill, n, syn.seed, id_prefix="mix-")])
    _write_jsonl(items, [it for skill in syn.train for it in eval_items(skill, syn.eval_per_skill)])
    if any(syn.prompts.values()):
        _write_jsonl(syn.prompts_file(), [p for skill, n in syn.prompts.items() for p in pool_prompts(skill, n, syn.seed)])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
