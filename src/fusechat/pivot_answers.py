"""The pivot's own answers to general prompts, written before prepare (``data.pivot_answers``).

Fine-tuning on narrow data (a few skills, short answers) moves a chat model away
from its general chat. Training also on what the pivot itself answers to general
prompts holds it there: the gold term is the pivot's own answer (greedy, or
sampled at ``temperature``: a sampled answer follows the pivot's distribution, so its
gold term pulls the pivot nowhere on average, where a greedy one sharpens it), and
MinCE picks the pivot's own distribution for these sequences, which no source knows
better. The answers come from the pivot's own chat template (as ``fusechat eval``
generates) and are written to ``<run_dir>/pivot_answers/answers.jsonl`` (ShareGPT
records) with a manifest; prepare reads that file after ``data.paths``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusechat.config import PivotAnswersConfig, RunConfig, stable_hash
from fusechat.data.general_prompts import GENERAL_PROMPTS
from fusechat.errors import DataError
from fusechat.generation import generate_answers
from fusechat.model_loading import device_map_for, load_causal_lm, load_tokenizer, model_hash, tokenizer_hash
from fusechat.progress import console, progress_bar
from fusechat.rundir import RunDir, build_output, is_complete

ANSWERS_FILE = "answers.jsonl"


def answers_file(cfg: RunConfig) -> Path:
    return RunDir(cfg.run_dir).stage("pivot_answers") / ANSWERS_FILE


def training_paths(cfg: RunConfig) -> list[str]:
    """What prepare reads: ``data.paths``, then the pivot's answers when they are asked for."""
    return [*cfg.data.paths, *([str(answers_file(cfg))] if cfg.data.pivot_answers else [])]


def read_prompts(settings: PivotAnswersConfig) -> list[str]:
    """The prompts to answer: the built-in ones or a text file's non-empty lines, cut to ``count``."""
    if settings.prompts == "builtin":
        prompts = list(GENERAL_PROMPTS)
    else:
        path = Path(settings.prompts)
        if not path.is_file():
            raise DataError(f"data.pivot_answers.prompts: no file {path} (a text file, one prompt per line, "
                            "or builtin)")
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); data.pivot_answers.prompts needs one "
                            "prompt per line") from None
        if not prompts:
            raise DataError(f"{path}: no prompt in it (data.pivot_answers.prompts needs one prompt per line)")
    return prompts[: settings.count]


def run(cfg: RunConfig, force: bool = False) -> Path | None:
    """Write the pivot's answers (skipped when complete for the same pivot, prompts and settings)."""
    settings = cfg.data.pivot_answers
    if settings is None:
        return None
    out = answers_file(cfg).parent
    prompts = read_prompts(settings)
    tokenizer = load_tokenizer(cfg.pivot)
    fingerprint = stable_hash({
        "pivot": {"path": cfg.pivot.path, "revision": cfg.pivot.revision, "model": model_hash(cfg.pivot),
                  "tokenizer": tokenizer_hash(tokenizer)},
        "prompts": prompts, "settings": settings.model_dump(mode="json", exclude={"prompts", "count", "device"}),
    })
    if is_complete(out, fingerprint, force, label="pivot answers"):
        return out
    model = load_causal_lm(cfg.pivot, settings.dtype, device_map_for(settings.device, "data.pivot_answers.device"))
    with progress_bar() as bar:
        task = bar.add_task(f"pivot answers ({cfg.pivot.name})", total=len(prompts))
        if settings.temperature > 0:
            import torch

            torch.manual_seed(settings.seed)
        answers = generate_answers(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                   settings.max_new_tokens, settings.batch_size,
                                   lambda n: bar.advance(task, n), settings.temperature)
    del model
    records = [{"id": f"pivot-answer-{i}", "conversations": [{"from": "human", "value": p},
                                                             {"from": "gpt", "value": a}]}
               for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    with build_output(out, "pivot_answers", fingerprint) as building:
        (building.folder / ANSWERS_FILE).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        building.manifest.update(pivot=cfg.pivot.name, prompts=len(prompts), answers=len(records),
                                 empty=len(prompts) - len(records), settings=settings.model_dump(mode="json"))
    console.print(f"pivot answers: {len(records)} of {len(prompts)} prompts answered by {cfg.pivot.name} → {out}")
    return out
