"""The zoo's catalog: which tiny chat models each zoo holds, how each is trained, and where it lives.

Plain data, read by a run whose config names a ``zoo:`` model (its default folder, its
skills, whether it is built); building one is ``fusechat.zoo.build``'s, which trains it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fusechat.config import stable_hash
from fusechat.rundir import read_manifest
from fusechat.synthetic.skills import SKILLS

# Where `zoo:` models go when their entry gives no path: the demo's own zoo folders, so they are reused.
DEFAULT_ROOT = "fusechat-demo"


@dataclass(frozen=True)
class ZooModel:
    name: str
    arch: str  # fusechat.zoo.architectures.ARCHITECTURES
    tokenizer: str  # fusechat.zoo.tokenizers.KINDS
    vocab_size: int
    hidden: int
    layers: int
    skills: dict[str, int]  # specialty skill -> training conversations
    steps: int
    learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    shared: int = 0  # conversations of every other skill, from the shared mixture
    max_length: int = 256  # tokens per conversation in training
    template: str = "openchat"  # the built-in chat template it is trained through (fusechat.zoo.build.TEMPLATE_TOKENS)
    # Train on, `more_steps` at a time (at most `max_rounds` times), until its exact match on held-out items of
    # its exact specialties reaches `until`: a skill learnt all at once comes at a different step in each build.
    until: float | None = None
    more_steps: int = 400
    max_rounds: int = 3

    def training_mix(self) -> dict[str, int]:
        """Skill -> conversations: the specialties, then the shared mixture's other skills."""
        return {**self.skills, **{s: self.shared for s in SKILLS if s not in self.skills and self.shared}}


@dataclass(frozen=True)
class ZooSpec:
    models: tuple[ZooModel, ...]
    extra: dict = field(default_factory=dict)

    def model(self, name: str) -> ZooModel:
        return next(m for m in self.models if m.name == name)


# The shared mixture's seed: its conversations differ from every specialty's (seed 0) and from
# the demo's fusion mixture (configs/demo.yaml).
SHARED_SEED = 500

# The demo's zoo: four generalists, each a different architecture, tokenizer family and size.
# The Llama pivot is the weakest on the specialists' skills; each specialist masters its own.
DESCRIBER = ZooModel("describer", "mixtral", "sp_bpe", 500, 64, 2, {"describe": 4000, "reverse": 4000},
                     steps=1500, shared=30)
DEMO_ZOO = ZooSpec(models=(
    # The pivot, a generalist, has seen a hundred conversations of every other skill: too few to answer them
    # (exact match 0), enough that the sources' answers teach it quickly (docs/demo.md).
    ZooModel("pivot", "llama", "byte_bpe", 600, 96, 3, {"repeat": 3000, "capitalise": 3000}, steps=1200, shared=100),
    DESCRIBER,
    ZooModel("forecaster", "qwen2", "byte_bpe", 900, 96, 2, {"forecast": 4000, "convert": 4000}, steps=1500,
             shared=30),
    # Character-level addition is learnt all at once, after about 75,000 examples: batches of 64.
    ZooModel("calculator", "gpt2", "char", 0, 96, 3, {"add": 6000}, steps=1200, batch_size=64, shared=10,
             until=0.9),
))

# A zoo of the smallest models that still exercise every stage: the whole pipeline in about a minute.
MICRO_ZOO = ZooSpec(models=(
    ZooModel("pivot", "llama", "byte_bpe", 400, 16, 1, {"repeat": 16, "describe": 4}, steps=2, batch_size=4),
    ZooModel("describer", "mixtral", "sp_bpe", 400, 16, 1, {"describe": 16}, steps=2, batch_size=4),
    ZooModel("converter", "gpt2", "char", 0, 16, 1, {"convert": 16}, steps=2, batch_size=4),
))

# The demo's describer trained through ChatML, a source for runs read through a ChatML pivot's own
# template (configs/real-smollm2-gemma3.yaml): a zoo model knows its skills only through the
# template it was trained on.
CHATML_ZOO = ZooSpec(models=(replace(DESCRIBER, template="chatml"),))

# Zoo name -> spec. A config's `zoo:` entry names a model of the demo zoo (`describer`) or of
# another zoo (`micro/describer`); it lives in `<zoo folder>/models/<model>`.
ZOOS = {"demo": DEMO_ZOO, "micro": MICRO_ZOO, "chatml": CHATML_ZOO}
ZOO_FOLDERS = {"demo": "zoo", "micro": "zoo-micro", "chatml": "zoo-chatml"}
DEMO_ZOOS = ("demo", "micro")  # the zoos `fusechat demo` fuses: a pivot and sources, all through OpenChat


def seeded(spec: ZooSpec, seed: int) -> ZooSpec:
    """The zoo ``spec`` built with ``seed`` (seed 0: as it is)."""
    return replace(spec, models=tuple(replace(m, seed=seed) for m in spec.models)) if seed else spec


def zoo_model(ref: str, seed: int = 0) -> tuple[str, ZooModel] | None:
    """(zoo name, model) of a `zoo:` entry built with ``seed`` (`zoo_build.seed`), or None when no zoo has it."""
    zoo, _, name = ref.rpartition("/")
    spec = ZOOS.get(zoo or "demo")
    found = [m for m in spec.models if m.name == name] if spec else []
    return (zoo or "demo", seeded(ZooSpec(models=(found[0],)), seed).models[0]) if found else None


def zoo_refs() -> list[str]:
    return [m.name if zoo == "demo" else f"{zoo}/{m.name}" for zoo, spec in ZOOS.items() for m in spec.models]


def zoo_problem(ref: str) -> str | None:
    """Why a `zoo:` entry names no model, or None."""
    if zoo_model(ref) is not None:
        return None
    return f"no zoo model named {ref!r} (the zoos have: {', '.join(zoo_refs())})"


def default_folder(ref: str, root: str = DEFAULT_ROOT, seed: int = 0) -> Path:
    """Where a zoo model goes when its entry gives no path: each zoo, and each seed of it, in a folder of its own."""
    zoo, _, name = ref.rpartition("/")
    folder = ZOO_FOLDERS.get(zoo or "demo", "zoo") + (f"-seed{seed}" if seed else "")
    return Path(root) / folder / "models" / name


def zoo_skills(ref: str) -> list[str]:
    """The skills a zoo model was trained on (what the table marks as its own)."""
    found = zoo_model(ref)
    return sorted(found[1].skills) if found else []


def spec_hash(model: ZooModel) -> str:
    fields = asdict(model)
    # Fields added since the first zoo leave the fingerprints of models that keep their defaults as they were.
    for key, default in (("template", "openchat"), ("until", None), ("more_steps", 400), ("max_rounds", 3)):
        if fields[key] == default:
            del fields[key]
    return stable_hash(fields)


def is_built(folder: Path, model: ZooModel) -> bool:
    """Whether ``folder`` holds ``model`` complete, built from the same spec."""
    manifest = read_manifest(folder) or {}
    return bool(manifest.get("complete")) and manifest.get("fingerprint") == spec_hash(model)


def entry_is_built(ref: str, folder: Path, seed: int = 0) -> bool:
    """Whether the `zoo:` entry ``ref`` is built with ``seed`` in ``folder``."""
    found = zoo_model(ref, seed)
    return found is not None and is_built(Path(folder), found[1])
