"""The implicit route's targets, trained by the train stage: ``implicit-sft`` then ``implicit-dpo``.

``implicit-sft`` is the pivot fine-tuned (λ = 1) on the SFT set of the score
stage, through the same path as the explicit route's ``sft`` baseline: the
chosen answers are rendered with the run's template (``prepare.template``),
the loss is on assistant tokens only, and the optimisation settings are the
``train`` section's, so ``sft`` and ``implicit-sft`` differ in their answers
alone. ``implicit-dpo`` starts from ``implicit-sft`` (also its reference model)
and learns from the preference pairs with TRL's ``DPOTrainer`` (or
``WRPOTrainer``), its checkpoints the unit of resume.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from trl import DPOConfig, DPOTrainer

from fusechat.config import IMPLICIT_DPO, IMPLICIT_SFT, SFT, RunConfig, stable_hash
from fusechat.data.conversations import Conversation, Message
from fusechat.data.templates import BUILTIN_TEMPLATES, get_template
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.implicit.score import pairs_folder, read_jsonl
from fusechat.implicit.wrpo import WRPOTrainer
from fusechat.model_loading import load_causal_lm, load_tokenizer, row_spec
from fusechat.prepare import Preparer, gold_rows
from fusechat.progress import console
from fusechat.rundir import RunDir, atomic_write_text, build_output, is_complete, require_complete
from fusechat.train.checkpoints import claim_work_folder, resume_point
from fusechat.train.targets import baseline_config, run_arguments, split_indices, train_target


def implicit_targets(cfg: RunConfig) -> list[str]:
    """The implicit route's targets, in training order; none on the explicit route alone."""
    return [IMPLICIT_SFT, IMPLICIT_DPO] if cfg.implicit_route else []


def train_implicit(cfg: RunConfig, name: str, force: bool = False) -> Path:
    if name == IMPLICIT_SFT:
        return train_implicit_sft(cfg, force)
    if name == IMPLICIT_DPO:
        return train_implicit_dpo(cfg, force)
    raise FusechatError(f"no implicit target {name!r} (targets: {IMPLICIT_SFT}, {IMPLICIT_DPO})")


def _pairs(cfg: RunConfig) -> tuple[Path, dict]:
    folder = pairs_folder(cfg)
    return folder, require_complete(folder, "SFT set and preference pairs", "fusechat score CONFIG")


def sft_rows(cfg: RunConfig, tokenizer, records: list[dict]) -> list[dict]:
    """The SFT set's conversations as training rows (``input_ids``, ``labels`` on the assistant tokens)."""
    convs = [Conversation(r["id"], f"{r['id']} (sft.jsonl)", [Message(m["role"], m["content"]) for m in r["messages"]])
             for r in records]
    preparer = Preparer(tokenizer, get_template(cfg.prepare.template, tokenizer), cfg.prepare.max_length)
    return list(preparer.rows(convs))


def train_implicit_sft(cfg: RunConfig, force: bool = False) -> Path:
    """The pivot fine-tuned on the best answers; with a prompt pool, on the gold conversations and the pool's best
    answers (sequence-level distillation: the baseline the explicit route's targets must beat)."""
    folder, manifest = _pairs(cfg)
    records = read_jsonl(folder / "sft.jsonl")
    tokenizer = load_tokenizer(cfg.pivot)
    rows = sft_rows(cfg, tokenizer, records)
    data = {"sft_set": manifest["fingerprint"], "template": cfg.prepare.template, "max_length": cfg.prepare.max_length}
    answers = f"the best sampled answers of {', '.join(s.path for s in cfg.sources)}"
    if cfg.pool_paths():
        gold, data["gold"] = gold_rows(cfg, tokenizer)
        rows = gold + rows
        answers = f"the gold conversations and {answers} to the prompt pool"
    if not rows:
        raise FusechatError(f"{folder / 'sft.jsonl'} holds no usable conversation ({len(records)} records); "
                            "see report.md there and the implicit.pairs rules")
    what = f"implicit fusion, first step: fine-tuning of the pivot (λ = 1) on {answers}"
    return train_target(baseline_config(cfg, SFT), IMPLICIT_SFT, force, prepared=rows, data=data, what=what)


def dpo_fingerprint(cfg: RunConfig, sft_manifest: dict, pairs_manifest: dict) -> str:
    return stable_hash({"implicit-sft": sft_manifest["fingerprint"], "pairs": pairs_manifest["fingerprint"],
                               "dpo": cfg.implicit.dpo.model_dump(mode="json"), "train": cfg.section_hash("train")})


def train_implicit_dpo(cfg: RunConfig, force: bool = False) -> Path:
    import datasets

    state = process_state("auto")
    rundir = RunDir(cfg.run_dir)
    start = rundir.stage("train", IMPLICIT_SFT)
    sft_manifest = require_complete(start, "implicit-sft target", f"fusechat train CONFIG --source {IMPLICIT_SFT}")
    folder, pairs_manifest = _pairs(cfg)
    out = rundir.stage("train", IMPLICIT_DPO)
    work = out.with_name(f".{IMPLICIT_DPO}.work")
    fingerprint = dpo_fingerprint(cfg, sft_manifest, pairs_manifest)
    if is_complete(out, fingerprint, force, label=f"train {IMPLICIT_DPO}"):
        return out
    if state.is_main_process:
        claim_work_folder(work, fingerprint, IMPLICIT_DPO, force)
    state.wait_for_everyone()
    records = read_jsonl(folder / "pairs.jsonl")
    if not records:
        raise FusechatError(f"{folder / 'pairs.jsonl'} holds no preference pair; see report.md there and the "
                            "implicit.pairs rules")
    d = cfg.implicit.dpo
    columns = ["prompt", "chosen", "rejected"] + (["target_chosen"] if d.loss == "wrpo" else [])
    train_idx, eval_idx = split_indices(len(records), cfg.train.eval_fraction, cfg.train.seed)
    dataset = datasets.Dataset.from_list([{k: records[i][k] for k in columns} for i in train_idx])
    eval_dataset = (datasets.Dataset.from_list([{k: records[i][k] for k in columns} for i in eval_idx])
                    if eval_idx else None)

    spec = row_spec(IMPLICIT_SFT, str(start))
    tokenizer = load_tokenizer(spec)
    device_map = None if state.device.type == "cpu" else str(state.device)
    model = load_causal_lm(spec, "fp32", device_map)
    reference = load_causal_lm(spec, "fp32", device_map)
    trainer_class = WRPOTrainer if d.loss == "wrpo" else DPOTrainer
    extra = {"wrpo_alpha": d.wrpo_alpha, "wrpo_ramp": d.wrpo_ramp} if d.loss == "wrpo" else {}
    trainer = trainer_class(model=model, ref_model=reference, args=dpo_arguments(cfg, work, bool(eval_idx), state),
                            train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer, **extra)
    last = resume_point(trainer, work, fingerprint, IMPLICIT_DPO, state)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if state.is_main_process:
        stats = {"train_loss": round(result.training_loss, 6), "steps": trainer.state.global_step,
                 "pairs": len(train_idx), "eval_pairs": len(eval_idx), "num_processes": state.num_processes,
                 "elapsed_s": round(time.time() - started, 3), "log_history": trainer.state.log_history}
        with build_output(out, "train", fingerprint, target=IMPLICIT_DPO, start=str(start),
                          settings=d.model_dump(mode="json"), **stats) as building:
            trainer.model.save_pretrained(str(building.folder), safe_serialization=True)
            if cfg.prepare.template in BUILTIN_TEMPLATES:
                tokenizer.chat_template = BUILTIN_TEMPLATES[cfg.prepare.template].jinja
            tokenizer.save_pretrained(str(building.folder))
            atomic_write_text(building.folder / "README.md", dpo_card(cfg, stats))
        console.print(f"train {IMPLICIT_DPO}: target saved to {out} ({stats['steps']} steps, "
                      f"loss {stats['train_loss']:.4f})")
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return out


def dpo_arguments(cfg: RunConfig, work: Path, has_eval: bool, state):
    """TRL's DPOConfig from ``implicit.dpo`` (and ``train`` for the schedule, logging and checkpoints)."""
    t, d = cfg.train, cfg.implicit.dpo
    per_step = d.per_device_batch_size * state.num_processes
    if d.global_batch_size % per_step:
        raise FusechatError(f"implicit.dpo.global_batch_size {d.global_batch_size} is not a multiple of "
                            f"per_device_batch_size {d.per_device_batch_size} × {state.num_processes} process(es)")
    return DPOConfig(
        **run_arguments(t, work, has_eval, state),
        per_device_train_batch_size=d.per_device_batch_size,
        per_device_eval_batch_size=d.per_device_batch_size,
        gradient_accumulation_steps=d.global_batch_size // per_step,
        num_train_epochs=d.epochs,
        max_steps=d.max_steps,
        learning_rate=d.learning_rate,
        beta=d.beta,
        loss_type=["sigmoid" if d.loss == "wrpo" else d.loss],
        max_length=d.max_length,
        truncation_mode="keep_start",
    )


def dpo_card(cfg: RunConfig, stats: dict) -> str:
    d = cfg.implicit.dpo
    loss = {"sigmoid": "DPO", "sigmoid_norm": "DPO on length-normalised log-ratios",
            "wrpo": f"WRPO, α → {d.wrpo_alpha} over the first {d.wrpo_ramp:.0%} of the steps"}[d.loss]
    return f"""---
library_name: transformers
tags: [fusechat, implicit-fusion]
base_model: {cfg.pivot.path}
---
# {IMPLICIT_DPO}: an implicit FuseChat target

Trained by fusechat: the pivot fine-tuned on the sources' best sampled answers (`{IMPLICIT_SFT}`),
then on preference pairs of scored answers ({loss}, β = {d.beta}), with TRL's DPOTrainer.

| setting | value |
|---|---|
| pivot | `{cfg.pivot.path}` |
| sources | {', '.join(f'`{s.path}`' for s in cfg.sources)} |
| scorer | {cfg.implicit.score.scorer} |
| pairs | {cfg.implicit.pairs.pair_from}, margin > {cfg.implicit.pairs.min_margin} |
| optimisation | lr {d.learning_rate}, {cfg.train.lr_scheduler}, global batch {d.global_batch_size} |
| steps | {stats['steps']} ({stats['pairs']} pairs) |
| final training loss | {stats['train_loss']:.4f} |

Chat template: `{cfg.prepare.template}`.
"""
