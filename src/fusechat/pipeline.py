"""The pipeline: a run config loaded once, its models and data made ready once, then the stages in order.

Each stage is a module with ``run(cfg, force=..., **options)``, named with its route and
place in ``fusechat.stages.STAGES``, and imported only when it runs. ``load_run`` is what
every command that runs stages calls. A model entry is a folder (or hub id), a GGUF file
(``fusechat.gguf_models``, converted once), or a model of the demo's zoo: the zoo's catalog
is read only for configs that name one, and its builder (which trains) imported only when
one must be built.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from fusechat.config import (
    DATA_SUFFIXES,
    GOLD,
    HUB_ID_RE,
    IMPLICIT_DPO,
    IMPLICIT_SFT,
    MULTI,
    RESERVED_NAMES,
    SFT,
    ModelSpec,
    RunConfig,
    ZooBuildConfig,
    load_config,
)
from fusechat.errors import ConfigError, DiskError, disk_errno
from fusechat.evaluate.humaneval.problems import load_problems
from fusechat.gguf_models import converted_folder, ensure_converted, is_converted, source_problem
from fusechat.judges.execution import ALLOW_ENV, execution_allowed
from fusechat.merge.registry import METHODS, check_merge_settings
from fusechat.model_loading import model_path_problem, reward_model_problem
from fusechat.progress import console, stage_line
from fusechat.rundir import RunDir, remove_dead_temporaries, run_lock
from fusechat.stages import stage as stage_record
from fusechat.stages import stages_of_route
from fusechat.synthetic.checker import skill_checker
from fusechat.synthetic.code_tasks import write_code_tasks
from fusechat.synthetic.mixture import ensure_synthetic, synthetic_problems

ZOO_CATALOG = "fusechat.zoo.catalog"  # plain data: read for configs with `zoo:` entries
ZOO_BUILDER = "fusechat.zoo.build"  # trains: imported only when a zoo model must be built


def route_stages(cfg: RunConfig) -> list[str]:
    """The stages of the config's route, in order."""
    return [s.name for s in stages_of_route(cfg.route, pool=bool(cfg.pool_paths()))]


def zoo_catalog():
    return importlib.import_module(ZOO_CATALOG)


def model_folder(spec: ModelSpec, zoo_build: ZooBuildConfig | None = None) -> Path:
    """Where the model's Hugging Face folder is: its `path`, or the default place of its GGUF conversion or zoo
    build (``zoo_build``: the run's root and seed of zoo builds)."""
    if spec.path is not None:
        return Path(spec.path)
    if spec.gguf is not None:
        return converted_folder(spec.gguf)
    zoo_build = zoo_build or ZooBuildConfig()
    return zoo_catalog().default_folder(spec.zoo, zoo_build.root, zoo_build.seed)


def load_run(path: str | os.PathLike, overrides: list[str] | None = None, runnable: bool = True) -> RunConfig:
    """The run config at ``path``: valid, every model given its folder, and (``runnable``) nothing missing."""
    cfg = load_config(path, overrides)
    problems = synthetic_problems(cfg) + merge_problems(cfg) + humaneval_problems(cfg)
    if problems:
        raise ConfigError(str(path), problems)
    resolve_paths(cfg)
    if runnable:
        require_runnable(cfg, source=str(path))
    return cfg


def merge_problems(cfg: RunConfig) -> list[str]:
    """The merge methods and parameters the config names, checked against the method registry (the number
    of targets is the merge stage's to check: a run may stop before it)."""
    m = cfg.merge
    problems = check_merge_settings(list(dict.fromkeys([m.method, *m.baselines])), m.params)
    for where, spec in [("pivot", cfg.pivot)] + [(f"sources[{i}]", s) for i, s in enumerate(cfg.sources)]:
        if spec.name in METHODS and spec.name not in RESERVED_NAMES:  # the config refuses the others itself
            problems.append(f"{where}.name {spec.name!r} is reserved: it names the {spec.name} merge "
                            f"(merged/{spec.name}); choose another name")
    return problems


def row_names(cfg: RunConfig) -> list[str]:
    """Every row this run's evaluation can have: the pivot, sources, targets and baselines, merges."""
    sources = [s.name for s in cfg.sources]
    return ["pivot", *sources, *(f"target-{s}" for s in sources), SFT, MULTI, IMPLICIT_SFT, IMPLICIT_DPO,
            *cfg.gold_targets(), GOLD, *dict.fromkeys([cfg.merge.method, *cfg.merge.baselines])]


def humaneval_problems(cfg: RunConfig) -> list[str]:
    """HumanEval rows that no row of this run is named: found before the run, not at its end."""
    known = row_names(cfg)
    return [f"eval.humaneval.rows[{i}] {name!r} names no row of this run (rows: {', '.join(known)})"
            for i, name in enumerate(cfg.eval.humaneval.rows or []) if name not in known]


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Give every model entry its folder (`path`), so that every stage reads `spec.path` alone;
    a zoo source without `skills` gets the skills it was trained on."""
    for spec in cfg.models:
        if spec.path is None:
            spec.path = str(model_folder(spec, cfg.zoo_build))
        if spec.zoo is not None and not spec.skills:
            spec.skills = zoo_catalog().zoo_skills(spec.zoo)
    return cfg


def run_problems(cfg: RunConfig) -> list[str]:
    """What a valid config still lacks to run here: data files, model folders, model packages."""
    problems = []
    generated = {str(f) for f in [*cfg.synthetic.files(), cfg.synthetic.prompts_file()]} if cfg.synthetic else set()
    generated |= {str(f) for f in cfg.code_tasks.files()} if cfg.code_tasks else set()
    for field, paths in (("paths", cfg.data.paths), ("prompts", cfg.data.prompts)):
        for i, p in enumerate(paths):
            if Path(p).exists() or str(Path(p)) in generated:
                continue
            if cfg.data.format in ("auto", "hf") and not p.endswith(DATA_SUFFIXES) and HUB_ID_RE.match(p) and "/" in p:
                continue  # a hub dataset id, loaded by the stage that reads it
            problems.append(f"data.{field}[{i}]: file not found: {p}")
    for where, m in [("pivot", cfg.pivot)] + [(f"sources[{i}]", s) for i, s in enumerate(cfg.sources)]:
        if m.gguf is not None:
            problem = None if is_converted(model_folder(m, cfg.zoo_build)) else source_problem(m.gguf)
            field = "gguf"
        elif m.zoo is not None:
            problem, field = zoo_catalog().zoo_problem(m.zoo), "zoo"
        else:
            problem, field = model_path_problem(m.path, m.hub), "path"
        if problem:
            problems.append(f"{where}.{field}: {problem}")
    score = cfg.implicit.score
    if cfg.implicit_route and score.scorer == "reward_model":
        problem = reward_model_problem(score.reward_model)
        if problem:
            problems.append(f"implicit.score.reward_model: {problem}")
    if (cfg.implicit_route or cfg.pool_paths()) and score.scorer == "execution" and not execution_allowed(
            score.allow_code_execution):
        problems.append(f"implicit.score.scorer execution runs the answers' code, which fusechat does only when "
                        f"you allow it: set implicit.score.allow_code_execution: true or {ALLOW_ENV}=1 "
                        "(docs/code-execution.md)")
    return problems


def require_runnable(cfg: RunConfig, source: str = "config") -> RunConfig:
    """The config, or a ConfigError listing everything a run of it still lacks."""
    problems = run_problems(cfg)
    if problems:
        raise ConfigError(source, problems, headline="not ready to run")
    return cfg


def validate_run(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """``fusechat validate``: the config with every default on stdout; on the console, that it is valid and,
    apart, what this machine still lacks to run it."""
    cfg = load_run(path, overrides, runnable=False)
    sys.stdout.write(cfg.to_yaml())
    problems = run_problems(cfg)
    console.print(f"{path}: valid config.", soft_wrap=True, markup=False)
    if problems:
        console.print("To run it, this machine still needs:\n" + "\n".join(f"  - {p}" for p in problems),
                      soft_wrap=True, markup=False)
    else:
        console.print("Everything it names is here: ready to run.")
    return cfg


def make_ready(cfg: RunConfig) -> None:
    """Once before the stages: the run's config saved, synthetic data written, GGUF and zoo models made."""
    resolve_paths(cfg)
    with run_lock(cfg.run_dir):
        RunDir(cfg.run_dir).save_config(cfg.to_yaml())
    ensure_synthetic(cfg)
    if cfg.code_tasks is not None:
        write_code_tasks(cfg.code_tasks, load_problems(cfg.eval.humaneval.data))
    seed = cfg.zoo_build.seed
    unbuilt = [s for s in cfg.models
               if s.zoo is not None and not zoo_catalog().entry_is_built(s.zoo, Path(s.path), seed)]
    if unbuilt:
        importlib.import_module(ZOO_BUILDER).build_entries(unbuilt, seed)
    for spec in cfg.models:
        if spec.gguf is not None:
            ensure_converted(spec)


def run_stage(stage: str, cfg: RunConfig, force: bool = False, **options) -> None:
    """One stage of a run whose models and data are ready (`make_ready`), holding the run directory's lock;
    temporaries that stopped runs left behind are removed first."""
    options = {k: v for k, v in options.items() if v is not None}
    if stage not in route_stages(cfg):
        console.print(f"{stage}: not a stage of route {cfg.route!r}, nothing to do")
        return
    if stage == "score" and cfg.implicit.score.scorer == "checker":
        options.setdefault("checker", skill_checker)  # the synthetic skills' checker; core modules know no skill
    with run_lock(cfg.run_dir):
        remove_dead_temporaries(cfg.run_dir)
        importlib.import_module(stage_record(stage).module).run(cfg, force=force, **options)


def run_stages(stages: list[str], cfg: RunConfig, force: bool = False, **options) -> None:
    """Make the run ready, then the given stages in order, all under one hold of the run directory's lock.
    A write the disk refuses stops the run with a message naming where (stages write whole files or none)."""
    try:
        with run_lock(cfg.run_dir):
            heading = stage_line if len(stages) > 1 else (lambda _: nullcontext())
            with heading("models"):
                make_ready(cfg)
            for stage in stages:
                with heading(stage):
                    run_stage(stage, cfg, force=force, **options)
    except OSError as e:
        if disk_errno(e) is None:
            raise
        raise DiskError(Path(e.filename).parent if e.filename else Path(cfg.run_dir), e) from None


def run_all(cfg: RunConfig, force: bool = False) -> None:
    """Every stage in order; complete stages skip themselves."""
    run_stages(route_stages(cfg), cfg, force=force)
