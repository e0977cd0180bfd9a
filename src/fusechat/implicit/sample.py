"""Implicit fusion, stage sample: several answers per training prompt from each model.

Each model answers with its own chat template (``ChatEncoder``, as in eval),
sampling at ``implicit.sample.temperature`` / ``top_p``, a batch of prompts at a
time with every sample of a prompt drawn in the same ``generate`` call. Output:
``<run_dir>/samples/<model>/shard-*.parquet`` (columns ``seq``, ``id``,
``sample``, ``response``, ``new_tokens``, ``finished``) and a manifest.

Shards of ``shard_size`` prompts are the unit of resume: each draws from its own
seed, so a run killed and resumed writes the same answers as one that was not.
Under ``accelerate launch`` each process takes every N-th shard.
"""

from __future__ import annotations

import time
from pathlib import Path

from fusechat.config import ModelSpec, RunConfig, SampleConfig, stable_hash
from fusechat.distributed import process_state
from fusechat.errors import DataError, FusechatError, listed
from fusechat.generation import (
    ChatEncoder,
    batches,
    context_length,
    fit_to_context,
    pad_batch,
    pad_id,
    stop_ids,
)
from fusechat.implicit.prompts import Prompt, load_prompts, prompts_fingerprint
from fusechat.implicit.work import finish_work, open_work, record_seconds, todo_shards, work_folder
from fusechat.model_loading import device_map_for, load_causal_lm, load_tokenizer, model_hash, tokenizer_hash
from fusechat.progress import console, progress_bar
from fusechat.rundir import RunDir, is_complete
from fusechat.shards import shard_files, shard_meta, shard_name, write_table

# Settings that change which answers are drawn (device and dtype aside, which change them by rounding only).
_SAMPLING_KEYS = ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "batch_size", "shard_size", "seed")


def sample_models(cfg: RunConfig) -> list[ModelSpec]:
    """The models that answer: ``implicit.sample.models``, or every source, then the pivot (for WRPO, or with
    ``implicit.pairs.include_pivot``). Ties between answers go to the earlier model: by default a source's answer
    over the pivot's, which teaches the pivot what it does not already say."""
    names = cfg.implicit.sample.models
    if names is None:
        names = [s.name for s in cfg.sources]
        if cfg.implicit.dpo.loss == "wrpo" or cfg.implicit.pairs.include_pivot:
            names = [*names, cfg.pivot.name]
    return [cfg.model(n) for n in names]


def model_fingerprint(cfg: RunConfig, spec: ModelSpec, tok_hash: str) -> str:
    s = cfg.implicit.sample
    return stable_hash({
        "prompts": prompts_fingerprint(cfg), "path": spec.path, "revision": spec.revision,
        "model": model_hash(spec), "tokenizer": tok_hash, "sampling": {k: getattr(s, k) for k in _SAMPLING_KEYS},
    })


def shard_seed(seed: int, model: str, shard: int) -> int:
    return int(stable_hash([seed, model, shard]), 16) % (2**31)


def run(cfg: RunConfig, force: bool = False, model: str | None = None) -> list[Path]:
    """Sample the answers of every answering model (or of the one named ``model``)."""
    specs = sample_models(cfg)
    if model is not None:
        if model not in [s.name for s in specs]:
            raise FusechatError(f"no answering model {model!r} in this run "
                                f"(implicit.sample.models: {', '.join(s.name for s in specs)})")
        specs = [cfg.model(model)]
    return [sample_model(cfg, spec, force) for spec in specs]


def sample_model(cfg: RunConfig, spec: ModelSpec, force: bool = False) -> Path:
    s = cfg.implicit.sample
    state = process_state(s.device)
    out = RunDir(cfg.run_dir).stage("sample", spec.name)
    work = work_folder(out)
    tokenizer = load_tokenizer(spec)
    fingerprint = model_fingerprint(cfg, spec, tokenizer_hash(tokenizer))
    if is_complete(out, fingerprint, force, label=f"sample {spec.name}"):
        return out
    prompts = load_prompts(cfg)
    num_shards = (len(prompts) + s.shard_size - 1) // s.shard_size
    if state.is_main_process:
        open_work(work, fingerprint, force)
    state.wait_for_everyone()
    todo = todo_shards(work, num_shards, state.process_index, state.num_processes)
    if todo:
        device_map = device_map_for(s.device, "implicit.sample.device", state.num_processes, state.device)
        lm = load_causal_lm(spec, s.dtype, device_map)
        check_prompts_fit(spec.name, prompts, ChatEncoder(tokenizer), s.max_new_tokens, context_length(lm))
        with progress_bar() as bar:
            task = bar.add_task(f"sample {spec.name}", total=sum(len(_shard(prompts, i, s)) for i in todo))
            for shard in todo:
                started = time.time()
                rows = sample_prompts(lm, tokenizer, _shard(prompts, shard, s), s,
                                      shard_seed(s.seed, spec.name, shard), lambda n: bar.advance(task, n))
                write_samples(work / shard_name(shard), rows, {
                    "shard": shard, "prompts": len(_shard(prompts, shard, s)), "samples": len(rows),
                    "new_tokens": sum(r["new_tokens"] for r in rows),
                    "unfinished": sum(not r["finished"] for r in rows),
                    "empty": sum(not r["response"] for r in rows),
                })
                record_seconds(work, shard, time.time() - started)
        del lm
    state.wait_for_everyone()
    if state.is_main_process:
        check_not_all_empty(spec.name, work)
        manifest = finish_work(work, out, "sample", fingerprint, num_shards, f"sample {spec.name}",
                               model=spec.name, path=spec.path, num_processes=state.num_processes,
                               settings=s.model_dump(mode="json"))
        empty = f", {manifest['empty']} empty (left out when scoring)" if manifest["empty"] else ""
        console.print(f"sample {spec.name}: {manifest['samples']} answers to {manifest['prompts']} prompts "
                      f"({manifest['unfinished']} cut at max_new_tokens{empty}) → {out}")
    state.wait_for_everyone()
    return out


def check_prompts_fit(model: str, prompts: list[Prompt], encoder: ChatEncoder, max_new_tokens: int,
                      context: int | None) -> None:
    """Every prompt fits ``model``'s context with room for its answer; else a DataError listing the records.

    Generation would keep only a too-long prompt's last tokens, and the answer would answer another text."""
    if not context:
        return
    _, max_new = fit_to_context([], max_new_tokens, context)
    room = context - max_new
    long = [(p, n) for p in prompts if (n := len(encoder.prompt_ids(p.messages))) > room]
    if not long:
        return
    raise DataError(f"{len(long)} prompt(s) too long for {model}: its context holds {context} tokens, "
                    f"{max_new} of them kept for the answer (implicit.sample.max_new_tokens, at most half the "
                    f"context), so a prompt may take {room}:\n"
                    f"{listed([f'{p.where()}: {n} tokens' for p, n in long])}\n"
                    "Shorten or remove these records, or lower implicit.sample.max_new_tokens.")


def check_not_all_empty(model: str, work: Path) -> None:
    """A model whose every answer is empty stops at once: its chat template or stop tokens are wrong."""
    metas = [shard_meta(p) for p in shard_files(work).values()]
    samples = sum(m.get("samples", 0) for m in metas)
    if samples and sum(m.get("empty", 0) for m in metas) == samples:
        raise FusechatError(f"sample {model}: all {samples} answers are empty (the model stops at once, or "
                            "writes only special tokens). Check its chat template (docs/chat.md) and its stop "
                            "tokens: `fusechat chat` with this model shows what it writes.")


def _shard(prompts: list[Prompt], shard: int, s: SampleConfig) -> list[Prompt]:
    return prompts[shard * s.shard_size:(shard + 1) * s.shard_size]


def sample_prompts(model, tokenizer, prompts: list[Prompt], s: SampleConfig, seed: int,
                   on_batch=None) -> list[dict]:
    """``samples_per_prompt`` sampled answers per prompt, as rows ordered by prompt then sample."""
    import torch
    from transformers import GenerationConfig

    encoder = ChatEncoder(tokenizer)
    ids, max_new = fit_to_context([encoder.prompt_ids(p.messages) for p in prompts], s.max_new_tokens,
                                  context_length(model))
    stops = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, stops)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                              top_k=0, num_return_sequences=s.samples_per_prompt, eos_token_id=stops or None,
                              pad_token_id=pad)
    n = s.samples_per_prompt
    answers: dict[int, list[dict]] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for idx in batches([len(p) for p in ids], s.batch_size):
            batch, mask = pad_batch([ids[i] for i in idx], pad, "left")
            with torch.inference_mode():
                out = model.generate(input_ids=batch.to(model.device), attention_mask=mask.to(model.device),
                                     generation_config=config)
            new = out[:, batch.shape[1]:].tolist()
            for j, i in enumerate(idx):
                answers[i] = [_answer_row(prompts[i], k, new[j * n + k], tokenizer, stops) for k in range(n)]
            if on_batch:
                on_batch(len(idx))
    finally:
        torch.random.set_rng_state(generator_state)
    return [row for i in range(len(prompts)) for row in answers[i]]


def _answer_row(prompt: Prompt, sample: int, new_ids: list[int], tokenizer, stops: list[int]) -> dict:
    cut = next((k for k, t in enumerate(new_ids) if t in stops), None)
    kept = new_ids if cut is None else new_ids[:cut]
    return {"seq": prompt.seq, "id": prompt.id, "sample": sample,
            "response": tokenizer.decode(kept, skip_special_tokens=True).strip(),
            "new_tokens": len(kept), "finished": cut is not None}


def write_samples(path: Path, rows: list[dict], meta: dict) -> int:
    import pyarrow as pa

    columns = {
        "seq": pa.array([r["seq"] for r in rows], pa.int64()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "sample": pa.array([r["sample"] for r in rows], pa.int32()),
        "response": pa.array([r["response"] for r in rows], pa.string()),
        "new_tokens": pa.array([r["new_tokens"] for r in rows], pa.int32()),
        "finished": pa.array([r["finished"] for r in rows], pa.bool_()),
    }
    return write_table(path, columns, meta)


def read_samples(folder: Path, shard: int | None = None) -> list[dict]:
    """The rows of a sample folder (or of one of its shards), in prompt order."""
    import pyarrow.parquet as pq

    files = shard_files(Path(folder))
    chosen = sorted(files.items()) if shard is None else [(shard, files[shard])] if shard in files else []
    rows: list[dict] = []
    for _, path in chosen:
        rows += pq.read_table(path).to_pylist()
    return rows
