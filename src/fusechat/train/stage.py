"""Stage 5, train: one target per source, initialised from the pivot, on that pair's fused targets.

Targets: one per source with a pairwise fusion method; one named ``multi`` with
``fuse.method: multi`` (the paper's Multi baseline); one named ``sft`` when
λ = 1 (plain fine-tuning on the same data, the paper's CLM row); on the implicit
route ``implicit-sft`` (λ = 1 on the best sampled answers, trained here) and
``implicit-dpo`` (``fusechat.train.implicit``). Each target is
trained with ``FusionTrainer`` (the Hugging Face Trainer) under
``<run_dir>/targets/.<name>.work/`` (checkpoints, TensorBoard logs), then saved
in Hugging Face format to ``<run_dir>/targets/<name>/`` with the tokenizer, the
run's chat template and a model card.

Resume: the work folder belongs to one fingerprint (``settings.json``): a rerun with
other inputs or settings starts afresh. A checkpoint counts once the Trainer has
written all of it (``fusechat-checkpoint.json``, written last); the newest such
checkpoint is resumed, newer half-written ones are removed with a message.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from fusechat.config import RunConfig, TrainConfig, stable_hash
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.fuse import MULTI, multi_config
from fusechat.models import load_causal_lm, load_tokenizer, model_hash, tokenizer_hash
from fusechat.prepare import load_prepared
from fusechat.progress import compact_active, console, stage_detail
from fusechat.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    build_output,
    fsync_tree,
    is_complete,
    read_manifest,
    require_complete,
)
from fusechat.train.data import FusionCollator, FusionDataset, load_fused
from fusechat.train.trainer import FusionTrainer

SFT = "sft"
WORK_SETTINGS = "settings.json"  # the fingerprint a work folder's checkpoints belong to
CHECKPOINT_SEAL = "fusechat-checkpoint.json"  # written last: the checkpoint is whole
IMPLICIT_SFT = "implicit-sft"
IMPLICIT_DPO = "implicit-dpo"
IMPLICIT_TARGETS = (IMPLICIT_SFT, IMPLICIT_DPO)
NOT_SOURCES = (SFT, MULTI, *IMPLICIT_TARGETS)  # targets that are no source's


def targets(cfg: RunConfig) -> list[str]:
    """Names of the targets this config trains: the explicit route's, its baselines (``train.baselines``),
    then the implicit route's."""
    names: list[str] = []
    if cfg.explicit_route:
        if cfg.train.lambda_ == 1.0 and cfg.train.lambda_end in (None, 1.0):
            names = [SFT]
        elif cfg.fuse.method == MULTI:
            names = [MULTI]
        else:
            names = [s.name for s in cfg.sources]
        names += cfg.train.baselines
    if cfg.implicit_route:
        names += IMPLICIT_TARGETS
    return list(dict.fromkeys(names))


def baseline_config(cfg: RunConfig, name: str) -> RunConfig:
    """The run's config as the baseline ``name`` trains with: λ = 1 for sft, every source fused for multi."""
    if name == SFT:
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lambda_": 1.0, "lambda_end": None})})
    if name == MULTI:
        return multi_config(cfg)
    return cfg


def _fused_inputs(cfg: RunConfig, name: str, pivot_tok_hash: str) -> tuple[Path | None, dict | None]:
    if name in (SFT, IMPLICIT_SFT):
        return None, None
    folder = RunDir(cfg.run_dir).stage("fuse", name)
    manifest = require_complete(folder, "fused targets", "fusechat fuse CONFIG")
    if manifest.get("pivot_tokenizer_hash") != pivot_tok_hash:
        raise FusechatError(
            f"the fused targets in {folder} were made for another pivot (tokenizer hash "
            f"{manifest.get('pivot_tokenizer_hash')} != {pivot_tok_hash}); rerun represent, align and fuse"
        )
    return folder, manifest


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())


def train_target(cfg: RunConfig, name: str, force: bool = False, prepared=None, data: dict | None = None) -> Path:
    """Train (or resume, or skip when complete) the target ``name`` and save it to ``targets/<name>/``.

    ``prepared``: rows to train on instead of the prepare stage's (``input_ids``, ``labels``), with ``data``
    saying what they are made from (their fingerprint and where they come from).
    """
    state = process_state("auto")
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("train", name)
    work = out.with_name(f".{name}.work")
    tokenizer = load_tokenizer(cfg.pivot)
    fused_dir, fused_manifest = _fused_inputs(cfg, name, tokenizer_hash(tokenizer))
    if data is None:
        data = {"prepared": (read_manifest(rundir.stage("prepare")) or {}).get("fingerprint")}
    payload = {**data, "fused": (fused_manifest or {}).get("fingerprint"),
               "pivot": {"path": cfg.pivot.path, "model": model_hash(cfg.pivot)}, "train": cfg.section_hash("train")}
    fingerprint = stable_hash(payload)
    if is_complete(out, fingerprint, force, label=f"train {name}"):
        if state.is_main_process and not cfg.train.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)  # a run killed between saving the target and this cleanup
        return out
    if state.is_main_process:
        claim_work_folder(work, fingerprint, name, force)
    state.wait_for_everyone()

    trainer, sizes = build_trainer(cfg, name, tokenizer, fused_dir, work, state, prepared)
    last = resume_point(trainer, work, fingerprint, name, state)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    final = trainer.model.merge_and_unload() if cfg.train.lora.enabled else trainer.model  # merge needs full weights
    # The Trainer's own training_loss covers only the steps since the resume; the log covers them all.
    train_loss = mean_logged_loss(trainer.state.log_history)
    if state.is_main_process:
        _save_target(cfg, name, final, tokenizer, out, fingerprint, {
            "train_loss": round(result.training_loss if train_loss is None else train_loss, 6),
            "steps": trainer.state.global_step,
            "num_processes": state.num_processes, **sizes,
            "elapsed_s": round(time.time() - started, 3), "log_history": trainer.state.log_history,
            "fused": str(fused_dir) if fused_dir else None, **({"data": data} if prepared is not None else {}),
        })
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return out


def resume_point(trainer, work: Path, fingerprint: str, name: str, state) -> Path | None:
    """Seal the trainer's checkpoints as they are written; the newest whole one of this fingerprint to resume
    from (newer torn ones are removed, with a message), or None."""
    trainer.add_callback(SealCheckpoints(fingerprint))
    if compact_active():
        show_on_stage_line(trainer, name)
    last, skipped = last_checkpoint(work / "checkpoints", fingerprint)
    state.wait_for_everyone()  # every process has chosen before the main one removes what it skipped
    if state.is_main_process:
        for path, problem in skipped:
            console.print(f"train {name}: skipping {path.name} ({problem}); removing it")
            shutil.rmtree(path, ignore_errors=True)
        if last:
            console.print(f"train {name}: resuming from {last}")
    state.wait_for_everyone()
    return last


def claim_work_folder(work: Path, fingerprint: str, name: str, force: bool) -> None:
    """Tie the work folder to this fingerprint: checkpoints of other inputs or settings are never resumed."""
    if work.exists():
        try:
            owner = json.loads((work / WORK_SETTINGS).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            owner = None
        if force or owner != fingerprint:
            if not force:
                console.print(f"train {name}: the checkpoints in {work} were made with other inputs or settings "
                              f"(fingerprint {owner} != {fingerprint}); starting afresh")
            shutil.rmtree(work)
    atomic_write_json(work / WORK_SETTINGS, {"fingerprint": fingerprint})


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint whole once the Trainer has written it, and logs the loss at every checkpoint
    and at the last step, so that the logged losses cover every step, before and after a resume."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            fsync_tree(folder)
            atomic_write_json(folder / CHECKPOINT_SEAL, {"fingerprint": self.fingerprint, "step": state.global_step})
        return control


class StageLineProgress(TrainerCallback):
    """Training progress as the compact console's stage detail: the target, its step and last loss."""

    def __init__(self, name: str):
        self.name = name
        self.loss = ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            console.print(f"{self.name}: {logs}", markup=False)  # into the compact console's log file
        if logs and "loss" in logs:
            self.loss = f", loss {float(logs['loss']):.3f}"

    def on_step_end(self, args, state, control, **kwargs):
        stage_detail(f"{self.name}: step {state.global_step}/{state.max_steps}{self.loss}")


def show_on_stage_line(trainer, name: str) -> None:
    """Replace the Trainer's progress bar and printed log dictionaries by one compact stage line."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageLineProgress(name))


def mean_logged_loss(history: list[dict]) -> float | None:
    """Mean training loss over every logged step: each logged value weighs the steps since the previous one."""
    total, steps, last = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


def build_trainer(cfg: RunConfig, name: str, tokenizer, fused_dir: Path | None, work: Path,
                  state, prepared=None) -> tuple[FusionTrainer, dict]:
    """The FusionTrainer of one target (the pivot, its data and the fused targets) and its data sizes;
    ``prepared``: rows to train on instead of the prepare stage's."""
    t = cfg.train
    prepared = load_prepared(cfg) if prepared is None else prepared
    train_idx, eval_idx = split_indices(len(prepared), t.eval_fraction, t.seed)
    if not train_idx:
        raise FusechatError(f"train {name}: no training sequence left (prepared: {len(prepared)}, "
                            f"held out for evaluation: {len(eval_idx)})")
    per_step = t.per_device_batch_size * state.num_processes
    if t.global_batch_size % per_step:
        raise FusechatError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of per_device_batch_size "
            f"{t.per_device_batch_size} × {state.num_processes} process(es)"
        )
    fused = load_fused(fused_dir, work / "cache") if fused_dir else None
    if fused is not None and len(fused) != len(prepared):
        raise FusechatError(f"{fused_dir} holds {len(fused)} sequences, the prepared data {len(prepared)}")

    model = load_causal_lm(cfg.pivot, "fp32", None if state.device.type == "cpu" else str(state.device))
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    trainer = FusionTrainer(
        model=model,
        args=training_arguments(t, work, t.global_batch_size // per_step, bool(eval_idx), state),
        train_dataset=FusionDataset(prepared, train_idx, fused),
        eval_dataset=FusionDataset(prepared, eval_idx, fused) if eval_idx else None,
        data_collator=FusionCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        lam=1.0 if fused is None else t.lambda_,
        lam_end=None if fused is None else t.lambda_end,
        fusion_kind=t.fusion_loss,
        temperature=t.temperature,
        chunked_loss=t.chunked_loss,
        loss_chunk_size=t.loss_chunk_size,
    )
    trainer.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let the Trainer average over accumulation
    return trainer, {"train_sequences": len(train_idx), "eval_sequences": len(eval_idx)}


def training_arguments(t: TrainConfig, work: Path, accumulation: int, has_eval: bool, state):
    """The Trainer's arguments for the train section; checkpoints under ``work``."""
    from transformers import TrainingArguments

    return TrainingArguments(
        **run_arguments(t, work, has_eval, state),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        **_checkpointing_arg(t.gradient_checkpointing),
        remove_unused_columns=False,
    )


def run_arguments(t: TrainConfig, work: Path, has_eval: bool, state) -> dict:
    """Trainer arguments every target shares (schedule, precision, seeds, logging, checkpoints, devices);
    checkpoints under ``work``."""
    return dict(
        output_dir=str(work / "checkpoints"),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a share of the steps
        weight_decay=t.weight_decay,
        bf16=t.bf16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.logging_steps if has_eval else None,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        use_cpu=state.device.type == "cpu",
        ddp_backend="gloo" if state.device.type == "cpu" and state.num_processes > 1 else None,
        disable_tqdm=not state.is_main_process,
        dataloader_num_workers=0,
    )


def _checkpointing_arg(enabled: bool) -> dict:
    """Activation checkpointing under its current TrainingArguments name."""
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    return {"activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing": enabled}


def last_checkpoint(folder: Path, fingerprint: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of this fingerprint under ``folder``, and the newer ones passed over
    with why (a kill during a save leaves one half-written)."""
    if not folder.is_dir():
        return None, []
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    skipped = []
    for _, path in found:
        problem = _checkpoint_problem(path, fingerprint)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _checkpoint_problem(path: Path, fingerprint: str) -> str | None:
    try:
        seal = json.loads((path / CHECKPOINT_SEAL).read_text())
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "not completely written"
    if seal.get("fingerprint") != fingerprint:
        return "made with other inputs or settings"
    return None


def _save_target(cfg: RunConfig, name: str, model, tokenizer, out: Path, fingerprint: str, stats: dict) -> None:
    with build_output(out, "train", fingerprint, target=name, pivot=cfg.pivot.path,
                      source=None if name in NOT_SOURCES else cfg.model(name).path,
                      settings=cfg.train.model_dump(mode="json", by_alias=True), **stats) as building:
        model.save_pretrained(str(building.folder), safe_serialization=True)
        if cfg.prepare.template in BUILTIN_TEMPLATES:
            tokenizer.chat_template = BUILTIN_TEMPLATES[cfg.prepare.template].jinja
        tokenizer.save_pretrained(str(building.folder))
        atomic_write_text(building.folder / "README.md", model_card(cfg, name, stats))
    console.print(f"train {name}: target saved to {out} ({stats['steps']} steps, loss {stats['train_loss']:.4f})")


def model_card(cfg: RunConfig, name: str, stats: dict) -> str:
    t = cfg.train
    if name == SFT:
        what = "plain fine-tuning of the pivot (λ = 1), the SFT baseline"
    elif name == IMPLICIT_SFT:
        what = ("implicit fusion, first step: fine-tuning of the pivot (λ = 1) on the best sampled answers of "
                f"{', '.join(s.path for s in cfg.sources)}")
    elif name == MULTI:
        what = f"fusion of all sources at once (Multi baseline): {', '.join(s.path for s in cfg.sources)}"
    else:
        what = f"pairwise fusion of source `{cfg.model(name).path}` into the pivot"
    lam = f"{t.lambda_}" + (f" → {t.lambda_end}" if t.lambda_end is not None else "")
    return f"""---
library_name: transformers
tags: [fusechat, knowledge-fusion]
base_model: {cfg.pivot.path}
---
# {name}: a FuseChat target

Trained by fusechat: {what}.

| setting | value |
|---|---|
| pivot | `{cfg.pivot.path}` |
| fusion | {cfg.fuse.method} (CE per {cfg.fuse.ce_unit}), top-{cfg.represent.top_k}, alignment `{cfg.align.method}` |
| loss | λ·CE(gold) + (1 − λ)·{t.fusion_loss.upper()}(fused), λ = {lam}, teacher temperature {t.temperature} |
| optimisation | lr {t.learning_rate}, {t.lr_scheduler}, warmup {t.warmup_ratio}, weight decay {t.weight_decay}, global batch {t.global_batch_size} |
| steps | {stats['steps']} ({stats['train_sequences']} training sequences) |
| LoRA | {'r = %d, merged into the weights' % t.lora.r if t.lora.enabled else 'no'} |
| final training loss | {stats['train_loss']:.4f} |

Chat template: `{cfg.prepare.template}`.
"""
