"""From scored answers to training data: the SFT set (a prompt's best answer) and preference pairs.

Rules (``implicit.pairs``):

- answers without a score (a judge reply with no rating) take no part;
- candidates are the sources' answers (and the pivot's with ``include_pivot``);
- SFT: the best candidate, kept when at least ``sft_min_score``;
- a DPO pair with ``pair_from: same_model`` is the best and the worst answer of one
  model, the model whose best answer scores highest among those whose best and worst
  differ by more than ``min_margin`` (FuseChat-3.0 pairs answers of one model so that
  chosen and rejected differ in quality, not in style); with ``any``, the best and the
  worst over all candidates;
- a WRPO triple adds the target's side: the source's chosen answer (the best
  candidate), the pivot's own best answer and, as rejected, the pivot's worst; it
  needs the source's answer better than the rejected one by more than ``min_margin``.

Ties go to the earlier model in ``implicit.sample.models`` order, then the lower sample index.
A pair whose chosen and rejected answers are the same text is skipped.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from fusechat.config import PairsConfig


@dataclass(frozen=True)
class Candidate:
    model: str
    sample: int
    response: str
    score: float


def _rank(c: Candidate, order: dict[str, int]) -> tuple:
    return (order.get(c.model, len(order)), c.sample)


def best(cands: list[Candidate], order: dict[str, int]) -> Candidate:
    return min(cands, key=lambda c: (-c.score, *_rank(c, order)))


def worst(cands: list[Candidate], order: dict[str, int]) -> Candidate:
    return min(cands, key=lambda c: (c.score, *_rank(c, order)))


def choose_sft(cands: list[Candidate], rules: PairsConfig, order: dict[str, int]) -> tuple[Candidate | None, str]:
    """(the SFT answer, "") or (None, why not)."""
    if not cands:
        return None, "no_scored_answer"
    top = best(cands, order)
    if rules.sft_min_score is not None and top.score < rules.sft_min_score:
        return None, "below_sft_min_score"
    return top, ""


def choose_pair(cands: list[Candidate], rules: PairsConfig,
                order: dict[str, int]) -> tuple[tuple[Candidate, Candidate] | None, str]:
    """((chosen, rejected), "") or (None, why not)."""
    if len(cands) < 2:
        return None, "fewer_than_two_answers"
    if rules.pair_from == "any":
        options = [(best(cands, order), worst(cands, order))]
    else:
        by_model: dict[str, list[Candidate]] = defaultdict(list)
        for c in cands:
            by_model[c.model].append(c)
        options = [(best(group, order), worst(group, order)) for group in by_model.values() if len(group) > 1]
        options.sort(key=lambda p: (-p[0].score, -(p[0].score - p[1].score), *_rank(p[0], order)))
    wide = [p for p in options if p[0].score - p[1].score > rules.min_margin]
    if not wide:
        return None, "no_margin"
    distinct = [p for p in wide if p[0].response != p[1].response]
    if not distinct:
        return None, "identical_answers"
    return distinct[0], ""


def choose_wrpo(source: list[Candidate], target: list[Candidate], rules: PairsConfig,
                order: dict[str, int]) -> tuple[tuple[Candidate, Candidate, Candidate] | None, str]:
    """((source chosen, target chosen, target rejected), "") or (None, why not)."""
    if not source:
        return None, "no_scored_answer"
    if len(target) < 2:
        return None, "fewer_than_two_target_answers"
    chosen, own_best, rejected = best(source, order), best(target, order), worst(target, order)
    if chosen.score - rejected.score <= rules.min_margin:
        return None, "no_margin"
    if chosen.response == rejected.response:
        return None, "identical_answers"
    return (chosen, own_best, rejected), ""


@dataclass
class PairSets:
    sft: list[dict]
    pairs: list[dict]
    report: dict


def build_pairs(prompts: list, answers: dict[int, list[Candidate]], rules: PairsConfig, models: list[str],
                pivot: str, wrpo: bool) -> PairSets:
    """The SFT records, the preference records and a report, from every prompt's scored answers.

    ``prompts``: objects with ``seq``, ``id``, ``messages``; ``answers``: prompt seq → its answers;
    ``models``: the answering models in order (ties go to the earlier).
    """
    order = {m: i for i, m in enumerate(models)}
    sft, pairs = [], []
    skipped_sft: Counter = Counter()
    skipped_pairs: Counter = Counter()
    stats: dict[str, dict] = {m: {"answers": 0, "scored": 0, "score_sum": 0.0, "sft": 0, "chosen": 0, "rejected": 0}
                              for m in models}
    margins = []
    for p in prompts:
        every = answers.get(p.seq, [])
        for c in every:
            st = stats.setdefault(c.model, {"answers": 0, "scored": 0, "score_sum": 0.0, "sft": 0, "chosen": 0,
                                            "rejected": 0})
            st["answers"] += 1
            if not math.isnan(c.score):
                st["scored"] += 1
                st["score_sum"] += c.score
        scored = [c for c in every if not math.isnan(c.score)]
        cands = [c for c in scored if c.model != pivot or rules.include_pivot]
        top, why = choose_sft(cands, rules, order)
        if top is None:
            skipped_sft[why] += 1
        else:
            stats[top.model]["sft"] += 1
            sft.append({"id": p.id, "seq": p.seq, "model": top.model, "sample": top.sample, "score": top.score,
                        "messages": [*p.messages, {"role": "assistant", "content": top.response}]})
        if wrpo:
            triple, why = choose_wrpo([c for c in scored if c.model != pivot], [c for c in scored if c.model == pivot],
                                      rules, order)
            pair = None if triple is None else (triple[0], triple[2])
        else:
            pair, why = choose_pair(cands, rules, order)
        if pair is None:
            skipped_pairs[why] += 1
            continue
        chosen, rejected = pair
        stats[chosen.model]["chosen"] += 1
        stats[rejected.model]["rejected"] += 1
        margins.append(chosen.score - rejected.score)
        record = {"id": p.id, "seq": p.seq, "prompt": p.messages,
                  "chosen": [{"role": "assistant", "content": chosen.response}],
                  "rejected": [{"role": "assistant", "content": rejected.response}],
                  "chosen_model": chosen.model, "rejected_model": rejected.model,
                  "chosen_score": chosen.score, "rejected_score": rejected.score}
        if wrpo:
            own = triple[1]
            record.update(target_chosen=[{"role": "assistant", "content": own.response}],
                          target_chosen_score=own.score)
        pairs.append(record)
    per_model = {m: {"answers": st["answers"], "scored": st["scored"],
                     "mean_score": round(st["score_sum"] / st["scored"], 4) if st["scored"] else None,
                     "sft": st["sft"], "chosen": st["chosen"], "rejected": st["rejected"]}
                 for m, st in stats.items()}
    report = {
        "prompts": len(prompts), "answers": sum(len(answers.get(p.seq, [])) for p in prompts),
        "unscored": sum(st["answers"] - st["scored"] for st in stats.values()),
        "sft": len(sft), "sft_skipped": dict(sorted(skipped_sft.items())),
        "pairs": len(pairs), "pairs_skipped": dict(sorted(skipped_pairs.items())),
        "kind": "wrpo" if wrpo else f"dpo ({rules.pair_from})",
        "mean_margin": round(sum(margins) / len(margins), 4) if margins else None,
        "per_model": per_model,
    }
    return PairSets(sft, pairs, report)


def format_report(report: dict) -> str:
    """The pair report as Markdown."""
    lines = [
        "# Implicit fusion: answers, SFT set and preference pairs", "",
        f"- prompts: {report['prompts']}, answers: {report['answers']} ({report['unscored']} without a score)",
        f"- SFT set: {report['sft']} prompts" + _skips(report["sft_skipped"]),
        f"- {report['kind']} pairs: {report['pairs']}" + _skips(report["pairs_skipped"]),
        f"- mean score margin of the pairs: {report['mean_margin']}", "",
        "| model | answers | mean score | SFT answers | chosen | rejected |", "|---|---|---|---|---|---|",
    ]
    for m, st in report["per_model"].items():
        lines.append(f"| {m} | {st['answers']} | {st['mean_score']} | {st['sft']} | {st['chosen']} | {st['rejected']} |")
    return "\n".join(lines) + "\n"


def _skips(skipped: dict) -> str:
    return f" (skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())})" if skipped else ""
