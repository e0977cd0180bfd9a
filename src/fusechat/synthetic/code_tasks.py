"""Python function tasks with tests, written by fusechat: training data for a code specialist's fusion.

Each task asks for one function (a name, its arguments, what it returns), carries
its tests (asserts on inputs drawn from the seed, expected values from fusechat's own
implementation) and a reference solution (the gold answer). Sixteen families, each
with parameters in its name and its text (``rotate_left_by_3``, ``sum_of_multiples_of_4_or_7``),
give several hundred distinct questions; tasks are seeded and deterministic.

None of them is a HumanEval problem: no task shares a function name with HumanEval,
nor a run of eight words with any of its prompts (``apart_from``; a test checks both
on the real problems).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from fusechat.errors import FusechatError
from fusechat.rundir import atomic_write_text

ASK = "Write a Python function `{signature}` that {does}. Answer with the function in one Python code block."


@dataclass(frozen=True)
class CodeTask:
    family: str  # "rotate", "shift", ...
    name: str
    signature: str  # "rotate_left_by_3(xs)"
    does: str  # what it returns, as the rest of the sentence
    solution: str  # the reference function
    tests: str  # asserts

    def question(self) -> str:
        return ASK.format(signature=self.signature, does=self.does)

    def answer(self) -> str:
        return f"```python\n{self.solution}```"


@dataclass(frozen=True)
class Family:
    make: Callable[[random.Random], tuple[str, str, str, str, Callable]]  # name, args, does, body, implementation
    inputs: Callable[[random.Random], tuple]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnoprstu") for _ in range(rng.randint(1, 9))) for _ in range(n))


def _ints(rng: random.Random, lo: int = -20, hi: int = 40, n: tuple[int, int] = (0, 9)) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


def _multiples(rng):
    a = rng.randint(2, 9)
    b = rng.choice([k for k in range(a + 1, 13) if k % a])
    return (f"sum_of_multiples_of_{a}_or_{b}", "n",
            f"returns the sum of the positive integers below n that are multiples of {a} or of {b}",
            f"    return sum(k for k in range(1, n) if k % {a} == 0 or k % {b} == 0)\n",
            lambda n: sum(k for k in range(1, n) if k % a == 0 or k % b == 0))


def _letters(rng):
    chosen = "".join(sorted(rng.sample("bcdfghjklmnpqrstvwxz", 3)))
    return (f"count_of_letters_{chosen}", "text",
            f"returns how many characters of the string text are one of {', '.join(chosen)}, in either case",
            f"    return sum(c in {chosen!r} for c in text.lower())\n",
            lambda text: sum(c in chosen for c in text.lower()))


def _longer(rng):
    k = rng.randint(2, 8)
    return (f"words_longer_than_{k}", "sentence",
            f"returns the list of the words of sentence (split on whitespace) that have more than {k} characters, "
            "in their order",
            f"    return [w for w in sentence.split() if len(w) > {k}]\n",
            lambda sentence: [w for w in sentence.split() if len(w) > k])


def _rotate(rng):
    k = rng.randint(1, 9)
    return (f"rotate_left_by_{k}", "xs",
            f"returns a new list with the items of the list xs rotated {k} places to the left (wrapping around; "
            "an empty list gives an empty list)",
            f"    if not xs:\n        return []\n    k = {k} % len(xs)\n    return xs[k:] + xs[:k]\n",
            lambda xs: (xs[k % len(xs):] + xs[:k % len(xs)]) if xs else [])


def _chunks(rng):
    k = rng.randint(2, 7)
    return (f"split_into_groups_of_{k}", "xs",
            f"returns the list xs cut into consecutive lists of {k} items, the last one shorter when the items run "
            "out",
            f"    return [xs[i:i + {k}] for i in range(0, len(xs), {k})]\n",
            lambda xs: [xs[i:i + k] for i in range(0, len(xs), k)])


def _shift(rng):
    k = rng.randint(1, 25)
    def impl(text):
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in text)
    return (f"shift_lowercase_by_{k}", "text",
            f"returns text with every lowercase ASCII letter moved {k} places forward in the alphabet (z wraps to a), "
            "every other character unchanged",
            f"    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in text)\n",
            impl)


def _prefix_mod(rng):
    m = rng.randint(2, 20)
    def impl(xs):
        out, total = [], 0
        for x in xs:
            total += x
            out.append(total % m)
        return out
    return (f"prefix_sums_modulo_{m}", "xs",
            f"returns the list of the running totals of the integers in xs, each taken modulo {m}",
            f"    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total % {m})\n"
            "    return out\n",
            impl)


def _digit_power(rng):
    p = rng.randint(2, 5)
    return (f"sum_of_digit_powers_{p}", "n",
            f"returns the sum of the decimal digits of the integer n (ignoring its sign), each raised to the power {p}",
            f"    return sum(int(d) ** {p} for d in str(abs(n)))\n",
            lambda n: sum(int(d) ** p for d in str(abs(n))))


def _between(rng):
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(1, 30)
    name_lo = f"minus_{-lo}" if lo < 0 else str(lo)
    return (f"keep_from_{name_lo}_to_{hi}", "xs",
            f"returns the items x of the list xs with {lo} <= x <= {hi}, in their order",
            f"    return [x for x in xs if {lo} <= x <= {hi}]\n",
            lambda xs: [x for x in xs if lo <= x <= hi])


def _every_kth(rng):
    k = rng.randint(2, 7)
    return (f"every_item_number_{k}", "xs",
            f"returns the list of every {k}th item of the list xs: its items at positions {k}, {2 * k}, {3 * k}, ... "
            "counting from 1",
            f"    return xs[{k - 1}::{k}]\n",
            lambda xs: xs[k - 1::k])


def _repeat_chars(rng):
    k = rng.randint(2, 5)
    return (f"each_character_{k}_times", "text",
            f"returns text with each of its characters written {k} times in a row",
            f"    return ''.join(c * {k} for c in text)\n",
            lambda text: "".join(c * k for c in text))


def _longest_run(rng):
    c = rng.choice("abcdefghijklmnoprstu")
    def impl(text):
        best = run = 0
        for ch in text:
            run = run + 1 if ch == c else 0
            best = max(best, run)
        return best
    return (f"longest_streak_of_{c}", "text",
            f"returns the length of the longest run of consecutive {c!r} characters in text (0 when there is none)",
            f"    best = run = 0\n    for ch in text:\n        run = run + 1 if ch == {c!r} else 0\n"
            "        best = max(best, run)\n    return best\n",
            impl)


def _pad(rng):
    w = rng.randint(4, 12)
    fill, fill_name = rng.choice([(".", "dots"), ("*", "stars"), ("-", "dashes"), ("_", "underscores")])
    return (f"right_align_{w}_with_{fill_name}", "text",
            f"returns text right-aligned in a field {w} characters wide, padded on the left with {fill!r}; text "
            f"longer than {w} characters comes back unchanged",
            f"    return text.rjust({w}, {fill!r})\n",
            lambda text: text.rjust(w, fill))


def _count_divisible(rng):
    k = rng.randint(2, 12)
    return (f"how_many_divisible_by_{k}", "xs",
            f"returns how many of the integers in the list xs are divisible by {k}",
            f"    return sum(1 for x in xs if x % {k} == 0)\n",
            lambda xs: sum(1 for x in xs if x % k == 0))


def _reverse_blocks(rng):
    k = rng.randint(2, 6)
    return (f"reverse_each_block_of_{k}", "xs",
            f"returns a new list made of the consecutive blocks of {k} items of xs, each block reversed (the last "
            "block may be shorter)",
            f"    out = []\n    for i in range(0, len(xs), {k}):\n        out.extend(reversed(xs[i:i + {k}]))\n"
            "    return out\n",
            lambda xs: [x for i in range(0, len(xs), k) for x in reversed(xs[i:i + k])])


def _weighted(rng):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return (f"alternating_weights_{a}_and_{b}", "xs",
            f"returns the sum of the integers in xs, those at even positions (0, 2, ...) multiplied by {a} and "
            f"those at odd positions by {b}",
            f"    return sum(x * ({a} if i % 2 == 0 else {b}) for i, x in enumerate(xs))\n",
            lambda xs: sum(x * (a if i % 2 == 0 else b) for i, x in enumerate(xs)))


def _text(rng):
    return (rng.choice([_words(rng, rng.randint(0, 7)),
                        "".join(rng.choice(string.ascii_letters + "  .,!") for _ in range(rng.randint(0, 20)))]),)


FAMILIES = [
    Family(_multiples, lambda rng: (rng.randint(0, 200),)),
    Family(_letters, _text),
    Family(_longer, lambda rng: (_words(rng, rng.randint(0, 8)),)),
    Family(_rotate, lambda rng: (_ints(rng),)),
    Family(_chunks, lambda rng: (_ints(rng, n=(0, 15)),)),
    Family(_shift, _text),
    Family(_prefix_mod, lambda rng: (_ints(rng),)),
    Family(_digit_power, lambda rng: (rng.randint(-99999, 99999),)),
    Family(_between, lambda rng: (_ints(rng, -30, 50, (0, 12)),)),
    Family(_every_kth, lambda rng: (_ints(rng, n=(0, 20)),)),
    Family(_repeat_chars, lambda rng: (_words(rng, rng.randint(0, 3)),)),
    Family(_longest_run, lambda rng: ("".join(rng.choice("abcdefghijklmnoprstu" * 1 + "aaaeeettt")
                                              for _ in range(rng.randint(0, 25))),)),
    Family(_pad, lambda rng: (_words(rng, rng.randint(0, 2)),)),
    Family(_count_divisible, lambda rng: (_ints(rng, -50, 100, (0, 12)),)),
    Family(_reverse_blocks, lambda rng: (_ints(rng, n=(0, 14)),)),
    Family(_weighted, lambda rng: (_ints(rng),)),
]
TESTS_PER_TASK = 6


def make_task(family: Family, rng: random.Random) -> CodeTask:
    name, args, does, body, impl = family.make(rng)
    cases = [family.inputs(rng) for _ in range(TESTS_PER_TASK)]
    tests = "".join(f"assert {name}({', '.join(map(repr, c))}) == {impl(*c)!r}\n" for c in cases)
    return CodeTask(family.make.__name__.strip("_"), name, f"{name}({args})", does, f"def {name}({args}):\n{body}",
                    tests)


def code_tasks(n: int, seed: int, skip: set[str] = frozenset()) -> list[CodeTask]:
    """``n`` tasks with distinct function names (none in ``skip``), seeded by ``seed``: the families in turn, and
    once a family has no new function left, another one drawn at random."""
    rng = random.Random(seed)
    tasks, seen = [], set(skip)
    while len(tasks) < n:
        turn = len(tasks) % len(FAMILIES)
        for attempt in range(400):
            task = make_task(FAMILIES[turn if attempt < 20 else rng.randrange(len(FAMILIES))], rng)
            if task.name not in seen:
                break
        else:
            raise FusechatError(f"code_tasks: only {len(tasks)} distinct tasks could be drawn; ask for fewer")
        seen.add(task.name)
        tasks.append(task)
    return tasks


def _grams(text: str, n: int = 8) -> list[tuple[str, ...]]:
    """The runs of ``n`` words of ``text`` (lowercase letters and digits), in order."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def apart_from(tasks: list[CodeTask], problems) -> list[str]:
    """What makes a task too close to a benchmark problem (``task_id``, ``prompt``, ``entry_point``): a shared
    function name, or a run of eight words its question shares with a problem's prompt; empty when apart."""
    names = {p.entry_point: p.task_id for p in problems}
    grams: dict[tuple[str, ...], str] = {}
    for p in problems:
        for g in _grams(p.prompt):
            grams.setdefault(g, p.task_id)
    found = []
    for t in tasks:
        if t.name in names:
            found.append(f"{t.name}: the function name of {names[t.name]}")
        shared = next((g for g in _grams(t.question()) if g in grams), None)
        if shared:
            found.append(f"{t.name}: '{' '.join(shared)}' is in {grams[shared]}")
    return found


def task_records(tasks: list[CodeTask], prefix: str, with_answer: bool) -> list[dict]:
    """JSONL records: the question (and the reference solution as the answer), with the task's ``tests``."""
    records = []
    for i, t in enumerate(tasks):
        messages = [{"role": "user", "content": t.question()}]
        if with_answer:
            messages.append({"role": "assistant", "content": t.answer()})
        records.append({"id": f"{prefix}{i}", "family": t.family, "function": t.name, "tests": t.tests,
                        "messages": messages})
    return records


def write_code_tasks(section, problems) -> None:
    """The section's gold.jsonl and prompts.jsonl (distinct functions across both), each checked apart from the
    benchmark's ``problems``; files that already hold the same records are left alone."""
    tasks = code_tasks(section.gold + section.prompts, section.seed)
    close = apart_from(tasks, problems)
    if close:
        raise FusechatError(f"code_tasks: {len(close)} task(s) too close to HumanEval, first {close[0]}; "
                         "choose another code_tasks.seed")
    gold_file, prompts_file = section.files()
    _write(gold_file, task_records(tasks[:section.gold], "code-gold-", True))
    _write(prompts_file, task_records(tasks[section.gold:], "code-pool-", False))


def _write(path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
