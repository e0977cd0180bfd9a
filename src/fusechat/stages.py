"""The stages of a run, in order: one record each. Everything that lists stages derives from ``STAGES``.

The run directory takes each stage's folder from here, the pipeline its module, order and
route, the command line its command, help and option, and the report which folders hold one
manifest per model. Adding a stage is one record here plus the module it names, which has
``run(cfg, force=False, **options)``.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPLICIT, IMPLICIT, BOTH = "explicit", "implicit", "both"


@dataclass(frozen=True)
class StageOption:
    """A stage's own command-line option (``--name``), passed to its ``run`` as a keyword."""

    name: str
    type: type
    default: object
    help: str


@dataclass(frozen=True)
class Stage:
    name: str  # the command and the key of the stage everywhere
    module: str  # imported when the stage runs (mergekit alone takes seconds to import)
    folder: str  # its output under the run directory
    route: str  # EXPLICIT, IMPLICIT or BOTH: the routes it belongs to
    help: str  # the command's help
    option: StageOption | None = None
    per_model: bool = False  # its folder holds one output (and manifest) per model
    pool: bool = False  # also runs on any route when the config has a prompt pool (`data.prompts`)
    own_command: bool = False  # the command line writes its command by hand (options beyond the table's)


STAGES: tuple[Stage, ...] = (
    # The prompt pool's answers come first: with a pool, the best of them join prepare's training data.
    Stage("sample", "fusechat.implicit.sample", "samples", IMPLICIT,
          "Several sampled answers per prompt (the prompt pool's, else the training data's) from each model.",
          StageOption("model", str, None, "Sample one answering model only."), per_model=True, pool=True),
    Stage("score", "fusechat.implicit.score", "scores", IMPLICIT,
          "Score every sampled answer, then build the SFT set (each prompt's best answer) and the preference pairs.",
          pool=True),
    Stage("prepare", "fusechat.prepare", "prepared", EXPLICIT,
          "Render and tokenize the conversations; loss only on assistant turns."),
    Stage("represent", "fusechat.represent", "represent", EXPLICIT,
          "Record every model's top-k next-token logits and per-sequence cross-entropy.",
          StageOption("model", str, None, "Run one model of the run only."), per_model=True),
    Stage("align", "fusechat.align", "align", EXPLICIT,
          "Map each source's distributions onto the pivot's tokens and vocabulary.", per_model=True),
    Stage("fuse", "fusechat.fuse", "fuse", EXPLICIT,
          "Choose, per sequence, the pivot's or the source's distribution (MinCE).", per_model=True),
    Stage("train", "fusechat.train", "targets", BOTH,
          "Train the targets: one per source on the fused distributions; implicit-sft and implicit-dpo.",
          StageOption("source", str, None, "Train one target only: a source's, sft, multi, implicit-sft or "
                                           "implicit-dpo."), per_model=True),
    Stage("merge", "fusechat.merge", "merged", EXPLICIT,
          "Merge the targets in parameter space (VaRM, SCE, mergekit's methods: docs/merge.md).",
          StageOption("analyze", bool, False, "Also write per-matrix weights and a heatmap."), per_model=True),
    Stage("eval", "fusechat.evaluate", "eval", BOTH,
          "Evaluate the pivot, sources, targets and merges on held-out items and MT-Bench; or any models "
          "with --models.", own_command=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r} (stages: {', '.join(STAGE_NAMES)})")


def stages_of_route(route: str, pool: bool = False) -> list[Stage]:
    """The stages a run of ``route`` (explicit, implicit or both) runs, in order; ``pool``: with a prompt pool."""
    return [s for s in STAGES if route == BOTH or s.route in (route, BOTH) or (pool and s.pool)]
