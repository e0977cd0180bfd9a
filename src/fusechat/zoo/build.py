"""``fusechat zoo build``: the tiny heterogeneous chat models the demo fuses.

Each zoo model has its own architecture, tokenizer family, size and skills. It is
initialised from a transformers config and trained with fusechat's own prepare and
train stages (λ = 1, plain fine-tuning) on plenty of conversations of its skills,
then saved in Hugging Face format with its tokenizer and its chat template (OpenChat, or
ChatML for the models of the ``chatml`` zoo, which real ChatML pivots such as SmolLM2 fuse).
Besides its specialties, a demo zoo model sees a small shared mixture of every other skill
(the same conversations for every model), so that, like real chat LLMs, each one is a
generalist with its own strengths. A model whose folder holds a complete manifest for the
same spec is reused. The catalog of zoos and models is ``fusechat.zoo.catalog``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict
from pathlib import Path

import yaml

from fusechat import prepare
from fusechat.config import ModelSpec, load_config
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.evaluate.items import parse_item
from fusechat.evaluate.stage import evaluate_models
from fusechat.progress import console, detail_prefix
from fusechat.rundir import build_output, read_manifest
from fusechat.synthetic.skills import SKILLS, conversations, eval_items
from fusechat.train.targets import train_target
from fusechat.zoo.architectures import build_model as init_model
from fusechat.zoo.catalog import DEMO_ZOO, SHARED_SEED, ZooModel, ZooSpec, is_built, spec_hash, zoo_model, zoo_problem
from fusechat.zoo.tokenizers import build_tokenizer

# Template -> (its text for the tokenizer's corpus, the end-of-sequence token). A ChatML model's
# eos is `<|im_end|>`, so that the text's turn ends are one token and generation stops there.
TEMPLATE_TOKENS = {
    "openchat": (["GPT4 Correct User: ", "GPT4 Correct Assistant: "], "</s>"),
    "chatml": (["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"], "<|im_end|>"),
}


def tokenizer_corpus(seed: int = 0, template: str = "openchat") -> list[str]:
    """Text of every skill (so that every tokenizer covers every character) and the template."""
    texts = list(TEMPLATE_TOKENS[template][0])
    for skill in SKILLS:
        for c in conversations(skill, 400, seed=1000 + seed):
            texts += [t["value"] for t in c["conversations"]]
    return texts


def build_entries(specs: list[ModelSpec], seed: int = 0) -> None:
    """Build the zoo models that the config entries ``specs`` name (each in its entry's folder, with the run's
    `zoo_build.seed`), side by side; under ``accelerate launch`` the main process builds and the others wait."""
    jobs = {}
    for spec in specs:
        out, model = zoo_job(spec.zoo, Path(spec.path), seed)
        jobs[(out, model.name)] = (out, model)
    state = process_state("auto")
    if state.is_main_process and jobs:
        build_models(list(jobs.values()))
    state.wait_for_everyone()


def zoo_job(ref: str, folder: Path, seed: int = 0) -> tuple[Path, ZooModel]:
    """(zoo folder, model) that builds the zoo model ``ref`` with ``seed`` into ``folder``."""
    found = zoo_model(ref, seed)
    if found is None:
        raise FusechatError(zoo_problem(ref))
    model = found[1]
    if folder.parent.name != "models" or folder.name != model.name:
        raise FusechatError(f"zoo model {ref!r}: its path must end in models/{model.name} (a zoo folder), "
                            f"not {folder}")
    return folder.parent.parent, model


def build_zoo(out: Path, spec: ZooSpec = DEMO_ZOO, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) every model of ``spec`` under ``out/models``; returns name -> folder."""
    out = Path(out)
    build_models([(out, model) for model in spec.models], force)
    return {model.name: out / "models" / model.name for model in spec.models}


def build_models(jobs: list[tuple[Path, ZooModel]], force: bool = False) -> None:
    """Build the zoo models of ``jobs`` ((zoo folder, model) pairs) that are not complete.

    Each model trains in its own process on one CPU thread, as many at a time as there are
    cores, the longest first. Models this small gain nothing from a second thread, so the
    cores are better spent on another model; and one thread makes the same model on every
    machine, whatever its core count. A process's output goes to ``<zoo>/work/<model>.log``,
    kept when the build fails.
    """
    todo = []
    for out, m in jobs:
        if force or not is_built(Path(out) / "models" / m.name, m):
            todo.append((Path(out), m))
        else:
            console.print(f"zoo {m.name}: {Path(out) / 'models' / m.name} is complete, reusing it")
    if not todo:
        return
    todo.sort(key=lambda job: -job[1].steps * job[1].batch_size)
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pool
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = {pool.submit(_build_alone, out, m, force): (out, m) for out, m in todo}
        failed = []
        for done in as_completed(running):
            out, m = running[done]
            log = out / "work" / f"{m.name}.log"
            try:
                seconds = done.result()
            except Exception as e:  # noqa: BLE001 - reported with the model's log below
                failed.append(f"zoo {m.name}: {e} (its output: {log})")
                continue
            log.unlink(missing_ok=True)
            console.print(f"zoo {m.name}: built in {seconds:.0f} s → {out / 'models' / m.name}")
    if failed:
        raise FusechatError("\n".join(failed))


def _build_alone(out: Path, model: ZooModel, force: bool) -> float:
    """In a worker process: one torch thread, output into the model's log; the build's wall time."""
    import torch

    torch.set_num_threads(1)
    log = out / "work" / f"{model.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w", encoding="utf-8", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        console.file = f
        build_model(out, model, force)
    return time.time() - started


def build_model(out: Path, model: ZooModel, force: bool = False) -> Path:
    """Build one zoo model in this process (``build_models`` runs it in a worker)."""
    folder = out / "models" / model.name
    if not force and is_built(folder, model):
        console.print(f"zoo {model.name}: {folder} is complete, reusing it")
        return folder
    fingerprint = spec_hash(model)
    started = time.time()
    work = out / "work" / model.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    data = work / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for skill, n in model.training_mix().items():
            own = skill in model.skills
            for c in conversations(skill, n, seed=model.seed if own else SHARED_SEED,
                                   id_prefix=f"{model.name}-" if own else "shared-"):
                f.write(json.dumps(c) + "\n")
    vocab = model.vocab_size or 10_000
    tok = build_tokenizer(model.tokenizer, tokenizer_corpus(template=model.template), vocab_size=vocab,
                          eos=TEMPLATE_TOKENS[model.template][1], chat_template=BUILTIN_TEMPLATES[model.template].jinja)
    init_model(model.arch, tok, out_dir=work / "init", seed=model.seed, hidden=model.hidden, layers=model.layers,
               heads=4, max_positions=512)
    with detail_prefix(f"zoo {model.name}, "):
        trained = _train(work, "run", model, work / "init", data, model.steps, "cosine", model.seed)
        rounds = _train_until(work, model, data, trained)
    trained = rounds[-1]["folder"] if rounds else trained
    trained_manifest = read_manifest(trained) or {}
    with build_output(folder, "zoo", fingerprint, started, spec=asdict(model), train=trained_manifest.get("train_loss"),
                      rounds=[{k: v for k, v in r.items() if k != "folder"} for r in rounds]) as building:
        for f in trained.iterdir():
            if f.is_file() and f.name not in ("manifest.json", "README.md"):
                shutil.copyfile(f, building.folder / f.name)
        (building.folder / "README.md").write_text(
            f"# {model.name}: a fusechat zoo model\n\n{model.arch} ({model.hidden} × {model.layers}), "
            f"{model.tokenizer} tokenizer, trained with fusechat (λ = 1) through the {model.template} "
            "chat template on: "
            + ", ".join(f"{s} ({n})" for s, n in model.training_mix().items()) + ".\n"
        )
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"zoo {model.name}: built in {time.time() - started:.0f} s → {folder}")
    return folder


def _train(work: Path, run: str, model: ZooModel, start: Path, data: Path, steps: int, schedule: str,
           seed: int) -> Path:
    """``steps`` of plain fine-tuning (λ = 1) of the model at ``start`` on ``data``, through the model's template."""
    config = {
        "run_dir": str(work / run),
        "pivot": {"name": model.name, "path": str(start)},
        "sources": [{"name": "itself", "path": str(start)}],
        "data": {"paths": [str(data)]},
        "prepare": {"template": model.template, "max_length": model.max_length},
        "train": {"lambda": 1.0, "max_steps": steps, "learning_rate": model.learning_rate,
                  "global_batch_size": model.batch_size, "per_device_batch_size": model.batch_size,
                  "warmup_ratio": 0.05 if schedule == "cosine" else 0.0, "lr_scheduler": schedule,
                  "logging_steps": max(1, steps // 5), "save_steps": steps, "report_to": ["none"], "seed": seed},
    }
    (work / f"{run}.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(work / f"{run}.yaml")
    prepare.run(cfg)
    return train_target(cfg, "sft")


# The held-out items a zoo model is checked on: drawn apart from the demo's evaluation items (seed 0).
CHECK_SEED, CHECK_ITEMS = 7, 60


def specialty_match(folder: Path, model: ZooModel) -> float | None:
    """Mean exact match of the model at ``folder`` on held-out items of its exact specialties (None: it has none)."""
    exact = [s for s in model.skills if SKILLS[s].kind == "exact"]
    if not exact:
        return None
    items = [parse_item(json.dumps(it)) for s in exact for it in eval_items(s, CHECK_ITEMS, seed=CHECK_SEED)]
    table = evaluate_models({model.name: str(folder)}, items, max_new_tokens=24, batch_size=64)
    return table["exact_match"][model.name]["average"]


def _train_until(work: Path, model: ZooModel, data: Path, trained: Path) -> list[dict]:
    """With ``model.until``: more rounds of ``model.more_steps`` (constant learning rate) while its exact match on
    its exact specialties is below ``until``; each round as {round, steps, exact_match, folder}."""
    if model.until is None:
        return []
    rounds = [{"round": 0, "steps": model.steps, "exact_match": specialty_match(trained, model), "folder": trained}]
    while rounds[-1]["exact_match"] is not None and rounds[-1]["exact_match"] < model.until \
            and len(rounds) <= model.max_rounds:
        k = len(rounds)
        console.print(f"zoo {model.name}: exact match {rounds[-1]['exact_match']:.2f} < {model.until} on its "
                      f"specialties; {model.more_steps} more steps (round {k})")
        trained = _train(work, f"run{k}", model, rounds[-1]["folder"], data, model.more_steps, "constant",
                         model.seed + k)
        rounds.append({"round": k, "steps": model.more_steps, "exact_match": specialty_match(trained, model),
                       "folder": trained})
    return rounds
