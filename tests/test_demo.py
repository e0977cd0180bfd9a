import json

import pytest

from fusechat.cli import main


def test_demo_runs_the_built_stages(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out)])
    assert exit_info.value.code == 0
    manifest = json.loads((out / "run" / "prepared" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["rows"] > 10
    assert manifest["counts"]["split"] >= 1  # the long sample conversation is split at max_length 160
    for model in ("pivot", "mixtral-sp", "gpt2-char"):
        assert json.loads((out / "run" / "represent" / model / "manifest.json").read_text())["complete"]
    for stage in ("align", "fuse", "targets"):
        for source in ("mixtral-sp", "gpt2-char"):
            assert json.loads((out / "run" / stage / source / "manifest.json").read_text())["complete"]
    for method in ("varm", "sce", "linear", "task_arithmetic", "ties", "dare", "slerp"):
        assert json.loads((out / "run" / "merged" / method / "manifest.json").read_text())["complete"]
    results = json.loads((out / "run" / "eval" / "results.json").read_text())
    rows = ["pivot", "mixtral-sp", "gpt2-char", "target-mixtral-sp", "target-gpt2-char", "varm", "sce", "linear",
            "task_arithmetic", "ties", "dare", "slerp"]
    assert list(results["bits_per_byte"]) == rows
    assert set(results["exact_match"]["pivot"]) == {"reverse", "add", "convert", "capitalise", "repeat", "average"}
