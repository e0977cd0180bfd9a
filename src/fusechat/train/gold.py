"""The GOLD baseline: TRL's cross-tokenizer distillation (``trl.experimental.gold``), one target per source.

What a user would reach for instead of fusechat: the pivot (or, with ``train.start:
implicit-sft``, the same start as the targets) distilled from one source by TRL's
GOLDTrainer, offline (``lmbda = 0``: the data's answers, no generation), with its hybrid
ULD loss (JSD on the tokens whose strings both vocabularies share, sorted-probability L1
on the others, over spans where both tokenizations end on the same byte). The same
conversations as the targets (the prepared data's sources: the gold and, with a prompt
pool, the best answers), rendered with the run's chat template, and the same steps,
batch and learning rate (``train``). GOLD reads the last assistant turn of each
conversation as the completion and aligns byte-level BPE tokenizers only; a source with
another tokenizer is refused before training. Saved to ``targets/gold-<source>/`` like a
target; a crash redoes the target (GOLD's run is not resumed from a checkpoint).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fusechat.config import GOLD, RunConfig, stable_hash
from fusechat.data.conversations import BadRecord
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.model_loading import load_causal_lm, load_tokenizer, model_hash, start_spec
from fusechat.prepare import PrepareStats, iter_conversations
from fusechat.rundir import RunDir, is_complete, require_complete
from fusechat.train.targets import run_arguments, save_target

SETTINGS = {"lmbda": 0.0, "use_uld_loss": True, "uld_use_hybrid_loss": True}  # offline, hybrid ULD


def source_of(name: str) -> str:
    """The source of GOLD target ``gold-<source>``."""
    return name[len(GOLD) + 1:]


def conversations(cfg: RunConfig) -> list[dict]:
    """The training conversations as GOLD reads them: ``{"messages": [{"role", "content"}, ...]}``."""
    rows = []
    for conv in iter_conversations(cfg, PrepareStats()):
        if isinstance(conv, BadRecord):
            continue  # prepare has reported them (or stopped on them)
        rows.append({"messages": [{"role": m.role, "content": m.content} for m in conv.messages]})
    return rows


def require_byte_level(tokenizer, label: str) -> None:
    """GOLD aligns tokens by their UTF-8 byte offsets, which it reads from byte-level BPE tokenizers only."""
    from trl.experimental.utils import encode_with_byte_offsets

    try:
        encode_with_byte_offsets(tokenizer.backend_tokenizer, ["a b"], add_special_tokens=False)
    except (NotImplementedError, AttributeError):
        raise FusechatError(f"train {GOLD}: TRL's GOLD aligns byte-level BPE tokenizers only, and {label}'s is "
                            "not one; leave it out of train.gold_sources") from None


def train_gold(cfg: RunConfig, name: str, force: bool = False) -> Path:
    """Distil source ``gold-<source>``'s model into the targets' start with GOLD; skip when complete."""
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    state = process_state("auto")
    rundir = RunDir(cfg.run_dir)
    source = cfg.model(source_of(name))
    out = rundir.stage("train", name)
    work = out.with_name(f".{name}.work")
    start = start_spec(cfg, name)
    prepared = require_complete(rundir.stage("prepare"), "prepared data", "fusechat prepare CONFIG")
    start_id = model_hash(start) if start is cfg.pivot else require_complete(
        Path(start.path), f"{start.name} target (train.start)", f"fusechat train CONFIG --source {start.name}"
    )["fingerprint"]
    fingerprint = stable_hash({"prepared": prepared["fingerprint"], "start": [start.path, start_id],
                               "source": [source.path, model_hash(source)], "train": cfg.section_hash("train"),
                               "gold": SETTINGS})
    if is_complete(out, fingerprint, force, label=f"train {name}"):
        return out

    tokenizer = load_tokenizer(cfg.pivot)
    teacher_tokenizer = load_tokenizer(source)
    require_byte_level(tokenizer, f"the pivot {cfg.pivot.name!r}")
    require_byte_level(teacher_tokenizer, f"source {source.name!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.prepare.template in BUILTIN_TEMPLATES:  # the text every model reads, as for the targets
        tokenizer.chat_template = BUILTIN_TEMPLATES[cfg.prepare.template].jinja
    t = cfg.train
    per_step = t.per_device_batch_size * state.num_processes
    if t.global_batch_size % per_step:
        raise FusechatError(f"train.global_batch_size {t.global_batch_size} is not a multiple of "
                            f"per_device_batch_size {t.per_device_batch_size} × {state.num_processes} process(es)")
    arguments = {**run_arguments(t, work, False, state), "save_strategy": "no"}
    args = GOLDConfig(**arguments, per_device_train_batch_size=t.per_device_batch_size,
                      gradient_accumulation_steps=t.global_batch_size // per_step, num_train_epochs=t.epochs,
                      max_steps=t.max_steps, learning_rate=t.learning_rate, max_length=cfg.prepare.max_length,
                      teacher_tokenizer_name_or_path=source.path, **SETTINGS)
    device = None if state.device.type == "cpu" else str(state.device)
    trainer = GOLDTrainer(model=load_causal_lm(start, "fp32", device), teacher_model=load_causal_lm(source, "fp32", device),
                          args=args, train_dataset=Dataset.from_list(conversations(cfg)), processing_class=tokenizer)
    started = time.time()
    result = trainer.train()
    if state.is_main_process:
        save_target(cfg, name, f"TRL's GOLD distillation (offline, hybrid ULD loss) of source `{source.path}` into "
                               "the pivot, the GOLD baseline", trainer.model, tokenizer, out, fingerprint, {
                        "train_loss": round(result.training_loss, 6), "steps": trainer.state.global_step,
                        "num_processes": state.num_processes, "train_sequences": len(trainer.train_dataset),
                        "elapsed_s": round(time.time() - started, 3), "log_history": trainer.state.log_history,
                        "gold": SETTINGS})
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return out
