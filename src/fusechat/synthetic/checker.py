"""The synthetic skills' checker: implicit fusion's scorer for the answers to synthetic prompts."""

from __future__ import annotations

from functools import lru_cache

from rapidfuzz import fuzz, process

from fusechat.synthetic.skills import ALL_SKILLS


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
