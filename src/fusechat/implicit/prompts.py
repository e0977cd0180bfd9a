"""The prompts the models answer: the prompt pool's (``data.prompts``, ``synthetic.prompts``), or else each
training conversation up to its last assistant turn.

A prompt keeps the top-level scalar fields of its record (``meta``: a synthetic
conversation's ``skill`` and ``key``, say), which scorers may read. A pool must not ask
what an evaluation item asks: its answers become training data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from fusechat.config import RunConfig, stable_hash
from fusechat.data.conversations import BadRecord, parse_prompt, parse_record
from fusechat.data.readers import iter_records
from fusechat.errors import DataError, listed
from fusechat.evaluate.items import load_items
from fusechat.rundir import sha256_tree


@dataclass
class Prompt:
    seq: int  # index among the run's prompts
    id: str
    origin: str  # file:line, for messages
    messages: list[dict]  # {"role", "content"}: the conversation before the answer
    meta: dict = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.origin} (record {self.id!r})"


def load_prompts(cfg: RunConfig) -> list[Prompt]:
    """The prompts to answer, in file order: the prompt pool's when the config has one (checked disjoint from the
    evaluation items), else the training data's; all of them, or ``implicit.sample.max_prompts`` drawn at random
    (seeded by ``implicit.sample.seed``)."""
    pool = cfg.pool_paths()
    prompts, bad = _read(cfg, pool or cfg.data.paths, pool=bool(pool))
    prompts = _checked(cfg, prompts, bad, pool or cfg.data.paths)
    if pool:
        check_disjoint(prompts, cfg.eval.data)
    return _subset(cfg, prompts)


def _read(cfg: RunConfig, paths: list[str], pool: bool) -> tuple[list[Prompt], list[BadRecord]]:
    prompts: list[Prompt] = []
    bad: list[BadRecord] = []
    index = 0
    for path in paths:
        for where, record in iter_records(path, cfg.data.split):
            index += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                conv = (parse_prompt if pool else parse_record)(record, cfg.data.format, where, index - 1)
            except BadRecord as e:
                bad.append(e)
                continue
            turns = [{"role": m.role, "content": m.content} for m in conv.messages]
            last = len(turns) if pool else max((i for i, t in enumerate(turns) if t["role"] == "assistant"),
                                                default=None)
            if last is None or not any(t["role"] == "user" for t in turns[:last]):
                bad.append(BadRecord("no_prompt", "no user turn before an assistant turn to answer", where))
                continue
            meta = {k: v for k, v in record.items()
                    if k not in ("id", "conversations", "messages") and isinstance(v, (str, int, float, bool))}
            prompts.append(Prompt(len(prompts), conv.id, where, turns[:last], meta))
    return prompts, bad


def _asked(messages: list[dict]) -> str:
    """What a conversation asks, for comparing prompts: its last user turn, whitespace and case folded."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return " ".join(last.split()).casefold()


def check_disjoint(prompts: list[Prompt], eval_files: list[str]) -> None:
    """Stop when a pool prompt asks what an evaluation item asks: its answer would be trained on."""
    asked: dict[str, tuple[str, str]] = {}
    for path in eval_files:
        if Path(path).is_file():
            for item in load_items(path):
                asked.setdefault(_asked(item.messages), (str(path), item.id))
    overlaps = [f"{p.where()} asks what evaluation item {asked[q][1]!r} of {asked[q][0]} asks: {q[:80]!r}"
                for p in prompts if (q := _asked(p.messages)) in asked]
    if overlaps:
        raise DataError(f"{len(overlaps)} prompt(s) of the prompt pool overlap the evaluation items (eval.data); "
                        f"their answers would be trained on. Remove them from the pool:\n{listed(overlaps)}")


def _subset(cfg: RunConfig, prompts: list[Prompt]) -> list[Prompt]:
    s = cfg.implicit.sample
    if s.max_prompts is None or s.max_prompts >= len(prompts):
        return prompts
    keep = sorted(random.Random(f"prompts:{s.seed}").sample(range(len(prompts)), s.max_prompts))
    return [replace(prompts[i], seq=n) for n, i in enumerate(keep)]


def _checked(cfg: RunConfig, prompts: list[Prompt], bad: list[BadRecord], paths: list[str]) -> list[Prompt]:
    if bad and cfg.data.on_bad_record == "error":
        raise DataError(f"{len(bad)} bad record(s) in {', '.join(paths)}:\n{listed([str(b) for b in bad])}\n"
                        "Fix them, or set data.on_bad_record: skip to drop them.")
    if not prompts:
        raise DataError(f"no prompt to sample answers for in {', '.join(paths)}")
    return prompts


def prompts_fingerprint(cfg: RunConfig) -> str:
    """What the prompts are made from: the data files and the settings that read them."""
    inputs = {p: (sha256_tree(p) if Path(p).exists() else "hub") for p in cfg.pool_paths() or cfg.data.paths}
    return stable_hash({"data": cfg.section_hash("data"), "inputs": inputs,
                               "max_prompts": cfg.implicit.sample.max_prompts, "seed": cfg.implicit.sample.seed})
