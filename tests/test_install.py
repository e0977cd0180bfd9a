"""What `pip install -e .` alone gives: the runtime never imports the test extra's packages."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with every module of the test extra made unimportable, as on a machine
# where only `pip install -e .` ran.
RUNNER = """
import sys
blocked = set(sys.argv[1].split(","))

class TestExtraIsNotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (test extra not installed)")
        return None

sys.meta_path.insert(0, TestExtraIsNotInstalled())
from fusechat.cli import main
main(sys.argv[2:])
"""


def _test_extra_modules() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in project["optional-dependencies"]["test"]}
    modules = {n.replace("-", "_") for n in names}
    return modules | ({"_pytest"} if "pytest" in modules else set())


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(sorted(_test_extra_modules())), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_test_extra_is_what_the_runner_blocks():
    assert {"pytest", "_pytest", "gguf"} <= _test_extra_modules()


def test_demo_help_and_validate_need_nothing_from_the_test_extra():
    shown = _run("demo", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "zoo of tiny chat models" in shown.stdout
    checked = _run("validate", "configs/demo.yaml")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("run_dir: fusechat-demo/run")
    assert "configs/demo.yaml: valid config." in checked.stderr


def test_the_blocker_really_blocks():
    # Without this, a runner that blocked nothing would pass the test above.
    probe = subprocess.run([sys.executable, "-c", RUNNER.replace("from fusechat.cli import main\nmain(sys.argv[2:])",
                                                                 "import gguf"), "gguf"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "test extra not installed" in probe.stderr
