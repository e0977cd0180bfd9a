"""Model-written code: refused unless allowed; when allowed, each program alone in its sandbox, where a crash,
a hang, a fork bomb, `rm -rf ~`, a huge file or a memory grab scores 0 and harms nothing."""

import os
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fusechat.errors import FusechatError
from fusechat.judges.execution import ALLOW_ENV, Limits, require_allowed, run_program

QUICK = Limits(cpu_s=2, wall_s=4.0, memory_mb=512, file_mb=1, processes=16)


def run(source: str, limits: Limits = QUICK):
    return run_program(textwrap.dedent(source), limits)


def test_running_model_written_code_is_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(FusechatError, match=rf"HumanEval runs code that models wrote, which fusechat does only when "
                                            rf"you allow it: set {ALLOW_ENV}=1\. Each program then runs alone"):
        require_allowed("HumanEval")
    require_allowed("HumanEval", config_allows=True)
    monkeypatch.setenv(ALLOW_ENV, "1")
    require_allowed("HumanEval")


def test_a_program_passes_when_it_exits_0_and_fails_otherwise():
    good = run("assert sum(range(4)) == 6\nprint('ok')")
    assert (good.passed, good.status, good.returncode) == (True, "passed", 0) and "ok" in good.output
    bad = run("assert 1 + 1 == 3")
    assert (bad.passed, bad.status, bad.returncode) == (False, "failed", 1) and "AssertionError" in bad.output


def test_a_fresh_folder_as_home_nothing_inherited_and_gone_after(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    seen = run("""
        import os, sys
        print(os.getcwd(), sorted(os.listdir('.')), sorted(os.environ), os.path.expanduser('~'))
        sys.exit(1 if 'OPENAI_API_KEY' in os.environ else 0)
    """)
    assert seen.passed, seen.output
    folder, listed, *_ = seen.output.split(" ", 2)
    assert listed == "['program.py']" and folder.rsplit("/", 1)[-1].startswith("fusechat-run-")
    assert f" {folder}\n" in seen.output  # ~ is its own folder
    assert "sk-secret" not in seen.output and not Path(folder).exists()


def test_a_crash_scores_0():
    crash = run("import ctypes\nctypes.string_at(0)")
    assert (crash.passed, crash.status) == (False, "killed") and crash.returncode < 0


def test_a_busy_loop_is_stopped_by_the_cpu_limit_and_a_sleep_by_the_timeout():
    started = time.monotonic()
    busy = run("while True:\n    pass", Limits(cpu_s=1, wall_s=10.0))
    assert not busy.passed and busy.status == "killed" and time.monotonic() - started < 8
    asleep = run("import time\ntime.sleep(60)", Limits(wall_s=1.0))
    assert (asleep.passed, asleep.status) == (False, "timeout") and asleep.seconds < 5


@pytest.mark.skipif(os.geteuid() != 0, reason="as root each program has a user of its own, whose processes are "
                                               "all killed after it")
def test_a_fork_bomb_is_held_by_the_process_limit_and_nothing_it_started_outlives_it():
    bomb = run("""
        import os, time
        pids = []
        for _ in range(4):  # children that leave the program's session: the group kill does not reach them
            pid = os.fork()
            if pid == 0:
                os.setsid()
                time.sleep(60)
                os._exit(0)
            pids.append(pid)
        print(' '.join(map(str, pids)), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, Limits(cpu_s=2, wall_s=3.0, processes=16))
    assert not bomb.passed
    pids = [int(p) for p in bomb.output.split("\n", 1)[0].split()]
    assert len(pids) == 4
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


@pytest.mark.skipif(os.geteuid() != 0, reason="as root each program runs as a user of its own, who owns no file")
def test_rm_rf_home_and_deleting_files_outside_its_folder_harm_nothing(tmp_path):
    canary = Path.home() / f".fusechat-canary-{uuid.uuid4().hex}"
    canary.write_text("still here")
    outside = tmp_path / "outside.txt"
    outside.write_text("still here")
    try:
        attack = run(f"""
            import os, shutil
            os.system('rm -rf ~')
            shutil.rmtree({str(Path.home())!r}, ignore_errors=True)
            try:
                os.remove({str(outside)!r})
            except OSError as e:
                print('refused:', e.strerror)
        """)
        assert canary.read_text() == "still here" and outside.read_text() == "still here"
        assert "refused: Permission denied" in attack.output
    finally:
        canary.unlink(missing_ok=True)


def test_a_huge_file_and_a_memory_grab_fail_within_their_limits():
    huge = run("open('big', 'wb').write(b'x' * (4 << 20))", Limits(file_mb=1))
    assert not huge.passed and huge.status in ("failed", "killed")
    grab = run("x = bytearray(2_000_000_000)", Limits(memory_mb=256))
    assert not grab.passed and "MemoryError" in grab.output


def test_code_of_an_answer_and_tests_that_must_run_to_their_end():
    from fusechat.judges.execution import code_of, passes_tests

    answer = "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\nand ```python\nother()\n```"
    assert code_of(answer) == "def f(x):\n    return x + 1\n"
    assert code_of("```py\nx = 1") == "x = 1"  # an unclosed block runs to the end
    assert code_of("def f(x): return x") == "def f(x): return x"  # no block: the whole answer
    assert passes_tests("def f(x):\n    return x + 1", "assert f(1) == 2", QUICK).passed
    assert not passes_tests("def f(x):\n    return x", "assert f(1) == 2", QUICK).passed
    left = passes_tests("def f(x):\n    return x\nraise SystemExit(0)", "assert f(1) == 2", QUICK)
    assert (left.passed, left.status, left.returncode) == (False, "failed", 0)  # exit 0 before the tests


def test_the_execution_scorer_scores_answers_by_their_prompts_tests(monkeypatch):
    from fusechat.config import ScoreConfig
    from fusechat.errors import DataError
    from fusechat.implicit.prompts import Prompt
    from fusechat.implicit.scorers import make_scorer

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(FusechatError, match="implicit.score.scorer execution runs code that models wrote"):
        make_scorer(ScoreConfig(scorer="execution"), None)
    scorer = make_scorer(ScoreConfig(scorer="execution", allow_code_execution=True, execution_timeout_s=3), None)
    ask = [{"role": "user", "content": "Write double(x)."}]
    prompts = [Prompt(i, f"p{i}", f"pool.jsonl:{i + 1}", ask, {"tests": "assert double(3) == 6"}) for i in range(3)]
    answers = ["```python\ndef double(x):\n    return 2 * x\n```", "def double(x):\n    return x + 2",
               "```python\ndef double(x):\n    while True:\n        pass\n```"]
    assert scorer.score(prompts, answers) == [1.0, 0.0, 0.0]
    with pytest.raises(DataError, match=r"pool.jsonl:1 \(record 'p0'\): field 'tests' is missing or empty"):
        scorer.score([Prompt(0, "p0", "pool.jsonl:1", ask, {})], answers[:1])


def test_a_run_scored_by_execution_stops_before_its_first_stage_unless_allowed(make_config, tmp_path, monkeypatch):
    from conftest import sharegpt, write_jsonl

    from fusechat.errors import ConfigError
    from fusechat.pipeline import load_run

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    data = write_jsonl(tmp_path / "train.jsonl", [sharegpt("Write double(x).", "def double(x): return 2 * x")])
    path = make_config([data], implicit={"score": {"scorer": "execution"}})
    path.write_text(path.read_text() + "route: implicit\n")
    with pytest.raises(ConfigError, match="implicit.score.scorer execution runs the answers' code"):
        load_run(path)
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert load_run(path).implicit.score.scorer == "execution"
