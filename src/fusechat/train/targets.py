"""Training one target from the pivot, with the fusion Trainer: the explicit route's targets and baselines.

Targets of the explicit route: one per source with a pairwise fusion method; one named
``multi`` with ``fuse.method: multi`` (the paper's Multi baseline); one named ``sft`` when
λ = 1 (plain fine-tuning on the same data, the paper's CLM row). ``train_target`` also trains
the pivot on other rows (the implicit route's ``implicit-sft``, the zoo's models). Each target
is trained with ``FusionTrainer`` (the Hugging Face Trainer) under
``<run_dir>/targets/.<name>.work/`` (checkpoints, TensorBoard logs; resume:
``fusechat.train.checkpoints``), then saved in Hugging Face format to
``<run_dir>/targets/<name>/`` with the tokenizer, the run's chat template and a model card.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fusechat.config import GOLD, IMPLICIT_SFT, MULTI, SFT, ModelSpec, RunConfig, TrainConfig, stable_hash
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.fuse import multi_config
from fusechat.model_loading import load_causal_lm, load_tokenizer, model_hash, start_spec, tokenizer_hash
from fusechat.prepare import load_prepared, pooled_rows
from fusechat.progress import console
from fusechat.rundir import RunDir, atomic_write_text, build_output, is_complete, read_manifest, require_complete
from fusechat.train.checkpoints import claim_work_folder, mean_logged_loss, resume_point
from fusechat.train.data import FusionCollator, FusionDataset, load_fused
from fusechat.train.trainer import FusionTrainer


def explicit_targets(cfg: RunConfig) -> list[str]:
    """Names of the targets the explicit route trains: one per source (or ``sft`` at λ = 1, or ``multi``),
    then its baselines (``train.baselines``); none on the implicit route alone."""
    if not cfg.explicit_route:
        return []
    if cfg.train.lambda_ == 1.0 and cfg.train.lambda_end in (None, 1.0):
        names = [SFT]
    elif cfg.fuse.method == MULTI:
        names = [MULTI]
    else:
        names = [s.name for s in cfg.sources]
    baselines = [b for b in cfg.train.baselines if b != GOLD]
    return list(dict.fromkeys(names + baselines + cfg.gold_targets()))


def baseline_config(cfg: RunConfig, name: str) -> RunConfig:
    """The run's config as the baseline ``name`` trains with: λ = 1 and the SFT schedule (`train.sft`) for sft (and
    implicit-sft), every source fused for multi."""
    if name == SFT:
        schedule = {k: v for k, v in cfg.train.sft.model_dump().items() if v is not None}
        return cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"lambda_": 1.0, "lambda_end": None, **schedule})})
    if name == MULTI:
        return multi_config(cfg)
    return cfg


def _start_identity(cfg: RunConfig, spec: ModelSpec) -> dict:
    if spec is cfg.pivot:
        return {"path": cfg.pivot.path, "model": model_hash(cfg.pivot)}
    manifest = require_complete(Path(spec.path), f"{IMPLICIT_SFT} target (train.start)",
                                f"fusechat train CONFIG --source {IMPLICIT_SFT}")
    return {"path": cfg.pivot.path, "model": model_hash(cfg.pivot), "start": manifest["fingerprint"]}


def _fused_inputs(cfg: RunConfig, name: str, pivot_tok_hash: str) -> tuple[Path | None, dict | None]:
    """The fuse stage's output for target ``name`` and its manifest; none for ``sft``."""
    if name == SFT:
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


def train_target(cfg: RunConfig, name: str, force: bool = False, prepared=None, data: dict | None = None,
                 what: str | None = None) -> Path:
    """Train (or resume, or skip when complete) the target ``name`` and save it to ``targets/<name>/``.

    ``prepared``: rows to train on instead of the prepare stage's (``input_ids``, ``labels``; λ = 1, since the
    fused distributions belong to the prepare stage's rows), with ``data`` saying what they are made from (their
    fingerprint and where they come from) and ``what`` what the target is, for its model card.
    """
    state = process_state("auto")
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("train", name)
    work = out.with_name(f".{name}.work")
    tokenizer = load_tokenizer(cfg.pivot)
    fused_dir, fused_manifest = (None, None) if prepared is not None else _fused_inputs(cfg, name,
                                                                                        tokenizer_hash(tokenizer))
    gold_only = name == SFT and prepared is None and bool(cfg.pool_paths())  # SFT on the gold alone: the baseline
    if data is None:
        data = {"prepared": (read_manifest(rundir.stage("prepare")) or {}).get("fingerprint"),
                **({"rows": "gold"} if gold_only else {})}
    start = start_spec(cfg, name)
    payload = {**data, "fused": (fused_manifest or {}).get("fingerprint"), "pivot": _start_identity(cfg, start),
               "train": cfg.section_hash("train")}
    fingerprint = stable_hash(payload)
    if is_complete(out, fingerprint, force, label=f"train {name}"):
        if state.is_main_process and not cfg.train.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)  # a run killed between saving the target and this cleanup
        return out
    if state.is_main_process:
        claim_work_folder(work, fingerprint, name, force)
    state.wait_for_everyone()

    trainer, sizes = build_trainer(cfg, name, tokenizer, fused_dir, work, state, prepared, gold_only, start)
    last = resume_point(trainer, work, fingerprint, name, state)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    final = trainer.model.merge_and_unload() if cfg.train.lora.enabled else trainer.model  # merge needs full weights
    # The Trainer's own training_loss covers only the steps since the resume; the log covers them all.
    train_loss = mean_logged_loss(trainer.state.log_history)
    if state.is_main_process:
        save_target(cfg, name, what, final, tokenizer, out, fingerprint, {
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


def build_trainer(cfg: RunConfig, name: str, tokenizer, fused_dir: Path | None, work: Path,
                  state, prepared=None, gold_only: bool = False,
                  start: ModelSpec | None = None) -> tuple[FusionTrainer, dict]:
    """The FusionTrainer of one target (the pivot, its data and the fused targets) and its data sizes;
    ``prepared``: rows to train on instead of the prepare stage's; ``gold_only``: leave out the rows made from
    the prompt pool's answers."""
    t = cfg.train
    prepared = load_prepared(cfg) if prepared is None else prepared
    train_idx, eval_idx = split_indices(len(prepared), t.eval_fraction, t.seed)
    if gold_only:
        pooled = pooled_rows(cfg, prepared)
        train_idx, eval_idx = [i for i in train_idx if i not in pooled], [i for i in eval_idx if i not in pooled]
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

    model = load_causal_lm(start or cfg.pivot, "fp32", None if state.device.type == "cpu" else str(state.device))
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
        lambda_=1.0 if fused is None else t.lambda_,
        lambda_end=None if fused is None else t.lambda_end,
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


def save_target(cfg: RunConfig, name: str, what: str | None, model, tokenizer, out: Path, fingerprint: str,
                 stats: dict) -> None:
    source = next((s.path for s in cfg.sources if s.name == name), None)
    with build_output(out, "train", fingerprint, target=name, pivot=cfg.pivot.path, source=source,
                      settings=cfg.train.model_dump(mode="json", by_alias=True), **stats) as building:
        model.save_pretrained(str(building.folder), safe_serialization=True)
        if cfg.prepare.template in BUILTIN_TEMPLATES:
            tokenizer.chat_template = BUILTIN_TEMPLATES[cfg.prepare.template].jinja
        tokenizer.save_pretrained(str(building.folder))
        atomic_write_text(building.folder / "README.md", model_card(cfg, name, stats, what))
    console.print(f"train {name}: target saved to {out} ({stats['steps']} steps, loss {stats['train_loss']:.4f})")


def _what(cfg: RunConfig, name: str) -> str:
    if name == SFT:
        gold = " on the gold conversations alone (not the prompt pool's answers)" if cfg.pool_paths() else ""
        return f"plain fine-tuning of the pivot (λ = 1){gold}, the SFT baseline"
    if name == MULTI:
        return f"fusion of all sources at once (Multi baseline): {', '.join(s.path for s in cfg.sources)}"
    return f"pairwise fusion of source `{cfg.model(name).path}` into the pivot"


def model_card(cfg: RunConfig, name: str, stats: dict, what: str | None = None) -> str:
    t = cfg.train
    what = what or _what(cfg, name)
    if start_spec(cfg, name) is not cfg.pivot:
        what += f", starting from the implicit route's {IMPLICIT_SFT} (train.start)"
    schedule = f"{t.lambda_}" + (f" → {t.lambda_end}" if t.lambda_end is not None else "")
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
| loss | λ·CE(gold) + (1 − λ)·{t.fusion_loss.upper()}(fused), λ = {schedule}, teacher temperature {t.temperature} |
| optimisation | lr {t.learning_rate}, {t.lr_scheduler}, warmup {t.warmup_ratio}, weight decay {t.weight_decay}, global batch {t.global_batch_size} |
| steps | {stats['steps']} ({stats['train_sequences']} training sequences) |
| LoRA | {'r = %d, merged into the weights' % t.lora.r if t.lora.enabled else 'no'} |
| final training loss | {stats['train_loss']:.4f} |

Chat template: `{cfg.prepare.template}`.
"""
