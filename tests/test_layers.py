"""The package's layering, read from its source (ast, nothing executed): no import loop, each module
importing only its own layer or those below, and fusechat imports inside functions only in the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fusechat"

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = {
    "foundation": ["fusechat", "fusechat.errors", "fusechat.progress", "fusechat.distributed", "fusechat.stages"],
    "config": ["fusechat.config"],
    "records": ["fusechat.rundir", "fusechat.shards", "fusechat.model_loading", "fusechat.gguf_models",
                "fusechat.wheels",
                "fusechat.data*"],
    "cores": ["fusechat.align.sequence", "fusechat.align.prefix", "fusechat.align.project", "fusechat.align.vocab",
              "fusechat.train.loss", "fusechat.train.chunked_loss", "fusechat.train.trainer", "fusechat.train.data",
              "fusechat.train.checkpoints", "fusechat.generation", "fusechat.judges*",
              "fusechat.merge.registry", "fusechat.merge.methods", "fusechat.merge.mergekit_methods",
              "fusechat.merge.tensors_io", "fusechat.merge.analysis", "fusechat.evaluate.items",
              "fusechat.evaluate.report", "fusechat.evaluate.pipeline_report",
              "fusechat.evaluate.rows", "fusechat.evaluate.retention", "fusechat.evaluate.mtbench.*",
              "fusechat.evaluate.jsonl", "fusechat.evaluate.humaneval.*",
              "fusechat.implicit.pairs", "fusechat.implicit.prompts", "fusechat.implicit.scorers",
              "fusechat.implicit.work", "fusechat.implicit.wrpo", "fusechat.synthetic*"],
    "stages": ["fusechat.pivot_answers", "fusechat.prepare", "fusechat.represent", "fusechat.align", "fusechat.align.stage", "fusechat.fuse",
               "fusechat.train", "fusechat.train.targets", "fusechat.train.parallel", "fusechat.train.gold", "fusechat.merge",
               "fusechat.merge.stage",
               "fusechat.evaluate", "fusechat.evaluate.stage", "fusechat.evaluate.mtbench",
               "fusechat.evaluate.mtbench.stage", "fusechat.evaluate.humaneval",
               "fusechat.evaluate.humaneval.stage", "fusechat.implicit", "fusechat.implicit.sample",
               "fusechat.implicit.score", "fusechat.implicit.train"],
    "zoo": ["fusechat.zoo*"],
    "pipeline": ["fusechat.pipeline"],
    "apps": ["fusechat.demo", "fusechat.chat"],
    "entry": ["fusechat.cli", "fusechat.__main__"],
}
# Modules allowed to import fusechat modules inside functions, with the reason in their docstring.
LAZY_IMPORTERS = {"fusechat.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, inside a function) for every fusechat import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fusechat"):
            # `from fusechat.x import y` imports y when y is a module, else x itself
            found += [(_resolve(f"{node.module}.{a.name}"), id(node) in inner) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(_resolve(a.name), id(node) in inner) for a in node.names if a.name.startswith("fusechat")]
    return found


def _layer(module: str) -> int:
    for rank, patterns in enumerate(LAYERS.values()):
        for p in patterns:
            if module == p or (p.endswith("*") and module.startswith(p.rstrip("*"))):
                return rank
    raise AssertionError(f"{module} is in no layer: place it in LAYERS (and in docs/architecture.md)")


GRAPH = {m: {dep for dep, _ in _imports(p) if dep != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    upward = [dep for dep in GRAPH[module] if _layer(dep) > _layer(module)]
    assert upward == [], f"{module} ({_layer(module)}) imports higher layers: {upward}"


def test_no_import_loop():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                raise AssertionError("import loop: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_config_imports_only_errors():
    assert GRAPH["fusechat.config"] == {"fusechat.errors"}


def test_fusechat_imports_sit_at_module_top():
    inside = sorted({m for m, p in MODULES.items() if any(lazy for _, lazy in _imports(p))} - LAZY_IMPORTERS)
    assert inside == []


def test_the_checker_sees_a_loop():
    # The graph walk must be able to fail: a two-module loop made up here is found.
    global GRAPH
    saved = GRAPH
    GRAPH = {**saved, "fusechat.errors": {"fusechat.config"}}
    try:
        with pytest.raises(AssertionError, match="import loop"):
            test_no_import_loop()
    finally:
        GRAPH = saved


# ---------------------------------------------------------------- what a command loads

_LOADED = """
import sys
from fusechat.cli import main
try:
    main(["validate", sys.argv[1]])
except SystemExit as e:
    assert e.code == 0, e.code
print("\\n".join(sorted(sys.modules)))
"""
# What trains, and the zoo's builder: a real run's validation needs none of it.
TRAINING = ("transformers.trainer", "trl", "peft", "fusechat.train", "fusechat.implicit.train", "fusechat.zoo.build",
            "fusechat.zoo.architectures", "fusechat.zoo.tokenizers")


def _loaded_by_validate(config: Path, cwd: Path) -> set[str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _LOADED, str(config)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def _matching(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_validating_the_real_config_loads_no_trainer_and_no_zoo_builder(tmp_path):
    loaded = _loaded_by_validate(PACKAGE.parents[1] / "configs" / "real-smollm2-gemma3.yaml", tmp_path)
    assert "fusechat.pipeline" in loaded and "fusechat.gguf_models" in loaded  # it did validate
    assert _matching(loaded, TRAINING) == []
    # Its `zoo: chatml/describer` source is checked against the zoo's catalog (plain data) and nothing more.
    assert _matching(loaded, ("fusechat.zoo",)) == ["fusechat.zoo", "fusechat.zoo.catalog"]


def test_a_config_without_zoo_models_loads_nothing_of_the_zoo(tmp_path):
    import yaml

    (tmp_path / "train.jsonl").write_text("")
    config = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "p", "path": str(tmp_path)},
              "sources": [{"name": "s", "gguf": {"file": "s.gguf"}}],
              "data": {"paths": [str(tmp_path / "train.jsonl")]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    loaded = _loaded_by_validate(tmp_path / "run.yaml", tmp_path)
    assert "fusechat.pipeline" in loaded
    assert _matching(loaded, TRAINING + ("fusechat.zoo",)) == []
