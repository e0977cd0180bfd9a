"""The ``synthetic`` section of a run config: skill conversations written before the first stage.

The files are a pure function of the section, so writing them again changes
nothing and keeps every later stage complete.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from rapidfuzz import fuzz, process

from fusechat.config import RunConfig
from fusechat.rundir import atomic_write_text
from fusechat.zoo.skills import ALL_SKILLS, conversations, eval_items


def synthetic_problems(cfg: RunConfig) -> list[str]:
    """Config problems of the `synthetic` section that only the skills themselves can tell."""
    if cfg.synthetic is None:
        return []
    unknown = [k for k in cfg.synthetic.train if k not in ALL_SKILLS]
    if not unknown:
        return []
    return [f"synthetic.train: unknown skill(s) {', '.join(map(repr, unknown))}; known: {', '.join(ALL_SKILLS)}"]


def skill_checker(prompt, response: str) -> float:
    """Implicit fusion's checker for synthetic conversations: 1.0 for a valid answer to the prompt's
    `skill` and `key` (the one answer of an exact skill, any answer a distribution skill can give), else
    the answer's similarity to the closest valid one, below 1 (rapidfuzz's ratio / 100): nearly right
    beats far off, so answers that are all wrong still rank."""
    skill, key = prompt.meta.get("skill"), prompt.meta.get("key")
    if skill is None or key is None:
        missing = "skill" if skill is None else "key"
        raise ValueError(f"the checker scorer needs the record's `{missing}` field (synthetic conversations "
                         "have `skill` and `key`); use implicit.score.scorer reward_model or judge for other data")
    if skill not in ALL_SKILLS:
        raise ValueError(f"field `skill`: unknown skill {skill!r}; known: {', '.join(ALL_SKILLS)}")
    valid = _valid_answers(skill, str(key))
    answer = response.strip()
    if answer in valid:
        return 1.0
    _, similarity, _ = process.extractOne(answer, valid, scorer=fuzz.ratio)
    return min(similarity / 100.0, 0.999)


@lru_cache(maxsize=4096)
def _valid_answers(skill: str, key: str) -> tuple[str, ...]:
    return tuple(sorted({a.strip() for a, p in ALL_SKILLS[skill].distribution(key) if p > 0}))


def ensure_synthetic(cfg: RunConfig) -> None:
    syn = cfg.synthetic
    if syn is None:
        return
    train, items = syn.files()
    _write_jsonl(train, [c for skill, n in syn.train.items()
                         for c in conversations(skill, n, syn.seed, id_prefix="mix-")])
    _write_jsonl(items, [it for skill in syn.train for it in eval_items(skill, syn.eval_per_skill)])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
