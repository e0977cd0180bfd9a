"""The package's layering, read from its source (ast, nothing executed): no import loop, each module
importing only its own layer or those below, and fusechat imports inside functions only in the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fusechat"

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = {
    "foundation": ["fusechat", "fusechat.errors", "fusechat.progress", "fusechat.distributed"],
    "config": ["fusechat.config"],
    "records": ["fusechat.rundir", "fusechat.shards", "fusechat.models", "fusechat.data*"],
    "cores": ["fusechat.align.sequence", "fusechat.align.prefix", "fusechat.align.project", "fusechat.align.vocab",
              "fusechat.train.loss", "fusechat.train.chunked_loss", "fusechat.train.trainer", "fusechat.train.data",
              "fusechat.merge.registry", "fusechat.merge.methods", "fusechat.merge.mergekit_methods",
              "fusechat.merge.tensors_io", "fusechat.merge.analysis", "fusechat.evaluate.items",
              "fusechat.evaluate.metrics", "fusechat.evaluate.report", "fusechat.evaluate.pipeline_report",
              "fusechat.evaluate.rows", "fusechat.evaluate.retention", "fusechat.evaluate.mtbench.*",
              "fusechat.train.preference", "fusechat.implicit.pairs", "fusechat.implicit.prompts",
              "fusechat.implicit.scorers", "fusechat.implicit.work"],
    "stages": ["fusechat.pivot_answers", "fusechat.prepare", "fusechat.represent", "fusechat.align", "fusechat.align.stage", "fusechat.fuse",
               "fusechat.train", "fusechat.train.stage", "fusechat.merge", "fusechat.merge.stage",
               "fusechat.evaluate", "fusechat.evaluate.stage", "fusechat.evaluate.mtbench",
               "fusechat.evaluate.mtbench.stage", "fusechat.implicit", "fusechat.implicit.sample",
               "fusechat.implicit.score", "fusechat.train.implicit"],
    "zoo": ["fusechat.zoo*", "fusechat.model_sources", "fusechat.synthetic"],
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
