"""Synthetic chat skills for the tiny zoo: seeded, deterministic, with held-out items.

Two kinds:

- ``exact`` skills have one right answer (judged by exact match): reversing a word,
  two-digit addition, unit conversion, capitalising a phrase, repeating a phrase.
- ``distribution`` skills have many valid answers drawn from a known distribution
  that depends on the prompt (judged by bits per byte against the exact entropy,
  which ``Skill.distribution`` enumerates): describing a named creature, a weather
  forecast for a city and month.

Every prompt is built around a *key* (a word, a pair of numbers, a name); keys are
split once into training and held-out sets by a hash, so a held-out item's key never
appears in any training conversation, whatever the wording of the question.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from itertools import product

SYLLABLES = ["ka", "lo", "mi", "re", "tu", "sa", "vo", "el", "di", "qua", "no", "pe", "zo", "ri", "ba", "fe"]
HELD_OUT_SHARE = 10  # one key in ten is held out


def held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def _word(rng: random.Random, low: int = 2, high: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(low, high)))


@dataclass(frozen=True)
class Skill:
    name: str
    kind: str  # "exact" or "distribution"

    def key(self, rng: random.Random) -> str:
        raise NotImplementedError

    def prompt(self, key: str, rng: random.Random) -> str:
        raise NotImplementedError

    def answer(self, key: str, rng: random.Random) -> str:
        raise NotImplementedError

    def distribution(self, key: str) -> list[tuple[str, float]]:
        """Every valid answer with its probability (exact skills: the one answer)."""
        return [(self.answer(key, random.Random(0)), 1.0)]

    def sample(self, rng: random.Random, split: str) -> tuple[str, str, str]:
        """(key, prompt, answer) with a key of the split ("train" or "heldout")."""
        for _ in range(10_000):
            key = self.key(rng)
            if held_out(key) == (split == "heldout"):
                return key, self.prompt(key, rng), self.answer(key, rng)
        raise RuntimeError(f"skill {self.name}: no key of split {split}")


class Reverse(Skill):
    def key(self, rng):
        return _word(rng, 2, 3)

    def prompt(self, key, rng):
        return rng.choice(["Reverse the word {w}.", "Spell {w} backwards.", "What is {w} reversed?"]).format(w=key)

    def answer(self, key, rng):
        return key[::-1]


class Add(Skill):
    def key(self, rng):
        return f"{rng.randint(10, 99)}+{rng.randint(10, 99)}"

    def prompt(self, key, rng):
        a, b = key.split("+")
        return rng.choice(["What is {a}+{b}?", "Add {a} and {b}.", "Compute {a} plus {b}."]).format(a=a, b=b)

    def answer(self, key, rng):
        a, b = key.split("+")
        return str(int(a) + int(b))


UNITS = [("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
         ("litres", "millilitres", 1000)]


class Convert(Skill):
    def key(self, rng):
        return f"{rng.randint(1, 99)} {rng.randrange(len(UNITS))}"

    def prompt(self, key, rng):
        n, u = key.split()
        src, dst, _ = UNITS[int(u)]
        return rng.choice(["Convert {n} {s} to {d}.", "How many {d} are {n} {s}?"]).format(n=n, s=src, d=dst)

    def answer(self, key, rng):
        n, u = key.split()
        _, dst, factor = UNITS[int(u)]
        return f"{int(n) * factor} {dst}"


class PhraseSkill(Skill):
    """A phrase of a few short invented words in; the same phrase, transformed, out."""

    max_words: int
    prompts: tuple[str, ...]

    def key(self, rng):
        return " ".join(_word(rng, 1, 2) for _ in range(rng.randint(2, self.max_words)))

    def prompt(self, key, rng):
        return rng.choice(self.prompts).format(p=key)


class Capitalise(PhraseSkill):
    max_words, prompts = 3, ("Capitalise: {p}", "Title case this: {p}")

    def answer(self, key, rng):
        return " ".join(w.capitalize() for w in key.split())


class Repeat(PhraseSkill):
    max_words, prompts = 4, ("Repeat after me: {p}", "Say exactly this: {p}")

    def answer(self, key, rng):
        return key


class SlotSkill(Skill):
    """Answers fill a fixed pattern slot by slot; slot probabilities depend on the key."""

    pattern = ""

    def slots(self, key: str) -> list[list[tuple[str, float]]]:
        raise NotImplementedError

    def answer(self, key, rng):
        choices = []
        for options in self.slots(key):
            words, probs = zip(*options)
            choices.append(rng.choices(words, weights=probs)[0])
        return self.pattern.format(*choices)

    def distribution(self, key):
        out = []
        for combo in product(*self.slots(key)):
            p = math.prod(prob for _, prob in combo)
            out.append((self.pattern.format(*(w for w, _ in combo)), p))
        return out


def _shift(options: list[tuple[str, float]], steps: int) -> list[tuple[str, float]]:
    """The same words with their probabilities rotated by ``steps``: keys move the distribution."""
    words = [w for w, _ in options]
    probs = [p for _, p in options]
    k = steps % len(probs)
    return list(zip(words, probs[-k:] + probs[:-k] if k else probs))


class Describe(SlotSkill):
    pattern = "a {} {} {} that {}"

    def key(self, rng):
        return _word(rng, 2, 3).capitalize()

    def prompt(self, key, rng):
        return rng.choice(["Describe {n}.", "What is {n} like?", "Tell me about {n}."]).format(n=key)

    def slots(self, key):
        syllables = len(key) // 2
        return [
            [("small", 0.5), ("large", 0.3), ("tiny", 0.2)],
            _shift([("green", 0.4), ("grey", 0.3), ("red", 0.2), ("blue", 0.1)], syllables),
            _shift([("heron", 0.5), ("wolf", 0.3), ("fox", 0.2)], ord(key[0])),
            [("sings at dawn", 0.5), ("hides in the snow", 0.25), ("roams the hills", 0.25)],
        ]


MONTHS = ["January", "April", "July", "October"]


class Forecast(SlotSkill):
    pattern = "{} skies, {}, with a {} wind."

    def key(self, rng):
        return f"{_word(rng, 2, 3).capitalize()} {rng.randrange(len(MONTHS))}"

    def prompt(self, key, rng):
        city, m = key.split()
        return rng.choice(["Weather in {c} in {m}?", "What is the forecast for {c} in {m}?"]).format(
            c=city, m=MONTHS[int(m)])

    def slots(self, key):
        city, m = key.split()
        season = int(m)
        return [
            _shift([("clear", 0.5), ("cloudy", 0.3), ("grey", 0.2)], season),
            _shift([("cold", 0.4), ("mild", 0.4), ("hot", 0.2)], season + len(city)),
            [("light", 0.6), ("strong", 0.4)],
        ]


class Chitchat(SlotSkill):
    """Small talk: a greeting by name, how the assistant is, an offer to help."""

    pattern = "{} {}! I am {}, thank you. {}"

    def key(self, rng):
        return _word(rng, 2, 3).capitalize()

    def prompt(self, key, rng):
        return rng.choice(["Hi, I am {n}. How are you?", "Hello! My name is {n}. How are you today?",
                           "Good morning, {n} here. How is it going?"]).format(n=key)

    def slots(self, key):
        return [
            _shift([("Hello", 0.5), ("Hi", 0.3), ("Good to meet you", 0.2)], len(key)),
            [(key, 1.0)],
            [("doing well", 0.5), ("fine", 0.3), ("great", 0.2)],
            [("How can I help you today?", 0.6), ("What would you like to talk about?", 0.4)],
        ]


SKILLS: dict[str, Skill] = {s.name: s for s in [
    Reverse("reverse", "exact"), Add("add", "exact"), Convert("convert", "exact"),
    Capitalise("capitalise", "exact"), Repeat("repeat", "exact"),
    Describe("describe", "distribution"), Forecast("forecast", "distribution"),
]}
# Skills beyond the demo's table: the real-models run adds small talk to its mixture.
ALL_SKILLS: dict[str, Skill] = {**SKILLS, "chitchat": Chitchat("chitchat", "distribution")}


def conversations(skill: str, n: int, seed: int, split: str = "train", id_prefix: str = "") -> list[dict]:
    """``n`` ShareGPT conversations of one skill (training keys only unless ``split="heldout"``)."""
    s = ALL_SKILLS[skill]
    rng = random.Random(f"{skill}:{split}:{seed}")
    out = []
    for i in range(n):
        key, prompt, answer = s.sample(rng, split)
        out.append({"id": f"{id_prefix}{skill}-{split}-{seed}-{i}", "skill": skill, "key": key,
                    "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    return out


def pool_prompts(skill: str, n: int, seed: int) -> list[dict]:
    """``n`` prompts of one skill without their answers (a prompt pool's records), training keys only, drawn
    apart from ``conversations`` of the same seed."""
    s = ALL_SKILLS[skill]
    rng = random.Random(f"{skill}:pool:{seed}")
    out = []
    for i in range(n):
        key, prompt, _ = s.sample(rng, "train")
        out.append({"id": f"pool-{skill}-{seed}-{i}", "skill": skill, "key": key,
                    "conversations": [{"from": "human", "value": prompt}]})
    return out


def eval_items(skill: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out evaluation items (``fusechat.evaluate`` JSONL records)."""
    s = ALL_SKILLS[skill]
    rng = random.Random(f"{skill}:eval:{seed}")
    items = []
    for i in range(n):
        key, prompt, answer = s.sample(rng, "heldout")
        item = {"id": f"{skill}-{i}", "skill": skill, "kind": s.kind, "key": key,
                "messages": [{"role": "user", "content": prompt}], "answer": answer}
        if s.kind == "distribution":
            item["entropy_bits"], item["expected_bytes"] = answer_entropy(skill, key)
        items.append(item)
    return items


def answer_entropy(skill: str, key) -> tuple[float, float]:
    """(H(A|x) in bits, E[bytes of A|x]) of the skill's true answer distribution for the question's key."""
    dist = ALL_SKILLS[skill].distribution(key)
    return (-sum(p * math.log2(p) for _, p in dist if p > 0), sum(p * len(a.encode()) for a, p in dist))


def entropy_floor(skill: str, items: list[dict]) -> float:
    """Exact bits per byte of the true distribution over these items' prompts: Σ H(A|x) / Σ E[bytes|x]."""
    bits = nbytes = 0.0
    for item in items:
        h, expected = answer_entropy(skill, item["key"])
        bits, nbytes = bits + h, nbytes + expected
    return bits / nbytes if nbytes else 0.0
