"""The docs describe what is really there: every config field, every shipped config valid."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from fusechat.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = field.alias or name
        yield prefix, key
        sub = field.annotation
        for candidate in (sub, *getattr(sub, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from _fields(candidate, key)


def test_every_config_field_is_documented():
    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [f"{p}.{k}" if p else k for p, k in _fields(RunConfig) if f"`{k}`" not in doc]
    assert missing == []


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    # As configs only: what a run needs (model files, the demo's data) may not be on this machine.
    load_config(path)


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] in readme.splitlines()  # the README's command, exactly, as the last step
    setup = "\n".join(ci[:-1])
    assert "-m venv" in setup and "activate" in setup and "rm -rf" in setup


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"


def test_every_merge_method_and_parameter_is_documented():
    import fusechat.merge  # noqa: F401  (registers every method)
    from fusechat.merge.registry import METHODS

    doc = (ROOT / "docs" / "merge.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| `")}
    missing = [f"{m.name}.{p.name}" for m in METHODS.values() for p in m.params
               if f"`{m.name}`" not in rows or f"`{p.name}`" not in rows[f"`{m.name}`"]]
    assert [m for m in METHODS if f"`{m}`" not in rows] == [] and missing == []


def test_architecture_map_names_real_files_and_every_module():
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    src = ROOT / "src" / "fusechat"
    named = set()
    for cell in re.findall(r"`([\w/{},.]+(?:\.py|/))`", doc):
        if cell.startswith(("tests/", "docs/", "configs/")):
            continue
        folder, _, rest = cell.rpartition("/") if "/" in cell.rstrip("/") else ("", "", cell)
        for name in re.sub(r"[{}]", "", rest).split(","):
            path = f"{folder}/{name}" if folder else name
            path = path if path.endswith(("/", ".py")) else f"{path}.py"
            assert (src / path).exists(), f"docs/architecture.md names {path}, which does not exist"
            named.add(path.rstrip("/"))
    modules = {p.relative_to(src).as_posix() for p in src.glob("*.py") if p.name != "__init__.py"}
    packages = {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    named |= {n.split("/")[0] for n in named if "/" in n}  # a package is named by its files
    assert sorted((modules | packages) - named - {"__main__.py"}) == []


def _top_level_names(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _architecture_rows() -> list[tuple[list[Path], list[str]]]:
    """(files, public entries) of each row of docs/architecture.md's file table."""
    import re

    src = ROOT / "src" / "fusechat"
    rows = []
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        files = []
        for named in re.findall(r"`([\w/.]+)`", cells[0]):
            path = src / named
            files += sorted(path.rglob("*.py")) if named.endswith("/") else [path]
        rows.append((files, re.findall(r"`(\w+)`", cells[2])))
    return rows


def test_architecture_map_names_each_files_real_entry_points():
    rows = _architecture_rows()
    assert len(rows) > 30
    wrong = [f"{name} (in {', '.join(f.name for f in files)})" for files, entries in rows for name in entries
             if not any(name in _top_level_names(f) for f in files)]
    assert wrong == []


def test_the_entry_point_check_sees_a_misplaced_name():
    # `read_records` lives in evaluate/jsonl.py, not in data/: the check must say so.
    data_files = sorted((ROOT / "src" / "fusechat" / "data").glob("*.py"))
    assert not any("read_records" in _top_level_names(f) for f in data_files)
    assert any("iter_records" in _top_level_names(f) for f in data_files)


def test_every_stage_has_its_command_in_the_readme():
    from fusechat.stages import STAGES

    readme = (ROOT / "README.md").read_text()
    assert [s.name for s in STAGES if f"| `fusechat {s.name} CONFIG" not in readme] == []
