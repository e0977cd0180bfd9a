import math
import random
from collections import Counter

import pytest

from fusechat.synthetic.skills import (
    SKILLS,
    conversations,
    entropy_floor,
    eval_items,
    held_out,
)


def test_generation_is_deterministic():
    for skill in SKILLS:
        assert conversations(skill, 20, seed=3) == conversations(skill, 20, seed=3)
        assert conversations(skill, 20, seed=3) != conversations(skill, 20, seed=4)
        assert eval_items(skill, 10) == eval_items(skill, 10)


def test_held_out_keys_never_appear_in_training():
    for skill in SKILLS:
        train = {c["key"] for seed in range(3) for c in conversations(skill, 300, seed)}
        heldout = {i["key"] for i in eval_items(skill, 50)}
        assert train and heldout and not train & heldout
        assert all(held_out(k) for k in heldout) and not any(held_out(k) for k in train)
        # No held-out key appears inside any training text, in any wording.
        texts = " ".join(t["value"] for seed in range(3) for c in conversations(skill, 300, seed)
                         for t in c["conversations"])
        if skill in ("reverse", "describe"):
            assert not any(f" {k}." in texts or f" {k}?" in texts for k in heldout)


def test_exact_answers_by_hand():
    rng = random.Random(0)
    assert SKILLS["reverse"].answer("kalo", rng) == "olak"
    assert SKILLS["add"].answer("47+38", rng) == "85"
    assert SKILLS["convert"].answer("12 0", rng) == "12000 metres"
    assert SKILLS["capitalise"].answer("mi kaso", rng) == "Mi Kaso"
    assert SKILLS["repeat"].answer("zo ri", rng) == "zo ri"


@pytest.mark.parametrize("skill", ["describe", "forecast"])
def test_distributions_are_exact(skill):
    s = SKILLS[skill]
    key = s.sample(random.Random(1), "train")[0]
    dist = dict(s.distribution(key))
    assert sum(dist.values()) == pytest.approx(1.0)
    # The sampler follows the enumerated distribution.
    rng = random.Random(2)
    counts = Counter(s.answer(key, rng) for _ in range(20000))
    for answer, p in dist.items():
        assert counts[answer] / 20000 == pytest.approx(p, abs=0.015)
    # Slots are independent: the entropy of the answer is the sum of the slots' entropies.
    h = -sum(p * math.log2(p) for p in dist.values())
    slots = sum(-sum(p * math.log2(p) for _, p in options) for options in s.slots(key))
    assert h == pytest.approx(slots)


def test_describe_entropy_by_hand():
    # "Kalo": size (.5 .3 .2), colour (.2 .1 .4 .3), animal (.5 .3 .2), verb (.5 .25 .25).
    s = SKILLS["describe"]
    h = lambda *ps: -sum(p * math.log2(p) for p in ps)  # noqa: E731
    expected = h(.5, .3, .2) + h(.2, .1, .4, .3) + h(.5, .3, .2) + h(.5, .25, .25)
    dist = s.distribution("Kalo")
    assert -sum(p * math.log2(p) for _, p in dist) == pytest.approx(expected)
    item = {"key": "Kalo"}
    mean_bytes = sum(p * len(a.encode()) for a, p in dist)
    assert entropy_floor("describe", [item]) == pytest.approx(expected / mean_bytes)


def test_exact_skills_have_zero_entropy():
    for skill in ("reverse", "add", "convert", "capitalise", "repeat"):
        assert entropy_floor(skill, eval_items(skill, 5)) == 0.0
