import json

from fusechat.demo import run_demo

FAST = ["synthetic.train={reverse: 3, add: 3, convert: 3, capitalise: 3, repeat: 3, describe: 3, forecast: 3}",
        "synthetic.prompts={reverse: 2, add: 2, convert: 2, describe: 2}", "train.sft.max_steps=2",
        "synthetic.eval_per_skill=2", "train.max_steps=2", "train.global_batch_size=4",
        "train.per_device_batch_size=4", "eval.max_new_tokens=4",
        "implicit.sample.samples_per_prompt=2", "implicit.sample.max_new_tokens=8", "implicit.dpo.max_steps=2",
        "implicit.dpo.global_batch_size=4", "implicit.dpo.per_device_batch_size=4",
        "fuse.max_ce=null"]  # the micro zoo is barely trained: the demo's gate would hold every sequence back


def test_micro_demo_runs_the_whole_pipeline(tmp_path, capfd):
    results = run_demo(tmp_path, zoo="micro", overrides=FAST)
    # the screen: one line per stage and the table; the stages' own output (the Trainer's too) in demo.log
    screen = capfd.readouterr()
    shown = screen.err + screen.out
    done = [line.split()[1] for line in shown.splitlines() if line.startswith("✓ ")]
    assert done == ["models", "sample", "score", "prepare", "represent", "align", "fuse", "train", "merge", "eval"]
    assert "'loss'" not in shown and "it/s" not in shown
    # the table on stdout, whole (a row per line, never wrapped), and only there; progress on stderr
    table = [line for line in screen.out.splitlines() if line.startswith("|")]
    assert any(line.startswith("| target-describer |") for line in table) and "| target-describer |" not in screen.err
    assert all(line.endswith("|") and line.count("|") == table[0].count("|") for line in table[:10])
    assert not any(line.startswith("✓ ") for line in screen.out.splitlines())
    log = (tmp_path / "demo.log").read_text()
    assert "train_runtime" in log and "varm" in log
    rows = ["pivot", "describer", "converter", "target-describer", "target-converter", "sft", "multi",
            "implicit-sft", "implicit-dpo", "varm", "sce", "linear", "task_arithmetic", "ties", "dare", "slerp"]
    assert list(results["bits_per_byte"]) == rows
    assert set(results["exact_match"]["pivot"]) == {"reverse", "add", "convert", "capitalise", "repeat", "average"}
    assert set(results["entropy_floor"]) == {"describe", "forecast"}
    assert 0 < results["entropy_floor"]["describe"] < 1
    assert results["source_skills"] == {"describer": ["describe"], "converter": ["convert"]}
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["source_skills"] == results["source_skills"]
    for name in ("results.md", "results.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "entropy floor" in (tmp_path / "eval" / "results.md").read_text()
    assert "| fused set | teacher |" in (tmp_path / "eval" / "results.md").read_text()
    # the zoo models were built where the config's `zoo:` entries put them
    for model in ("pivot", "describer", "converter"):
        assert json.loads((tmp_path / "zoo-micro" / "models" / model / "manifest.json").read_text())["complete"]
    # what the stages recorded, read back from their manifests beside the scores
    pipeline = results["pipeline"]
    run = tmp_path / "run"
    for source in ("describer", "converter"):
        manifest = json.loads((run / "align" / source / "manifest.json").read_text())
        assert pipeline["alignment"][source]["aligned_share"] == manifest["aligned_share"]
        assert sum(pipeline["alignment"][source]["vocab_coverage"].values()) == manifest["source_vocab_size"]
        fused = json.loads((run / "fuse" / source / "manifest.json").read_text())
        assert pipeline["fusion"][source] == fused["choices"]
        assert pipeline["teachers"][source] == fused["teachers"]
    for model in ("pivot", "describer", "converter"):
        manifest = json.loads((run / "represent" / model / "manifest.json").read_text())
        assert pipeline["representation"][model]["bytes_per_token"] == manifest["bytes_per_token"]
    trained = [json.loads((run / "targets" / t / "manifest.json").read_text())["elapsed_s"]
               for t in ("describer", "converter", "sft", "multi", "implicit-sft", "implicit-dpo")]
    assert pipeline["stage_seconds"]["train"] == round(sum(trained), 1)
    assert "## Pipeline" in (tmp_path / "eval" / "results.md").read_text()
    # the prompt pool: every prompt answered by both specialists and the pivot, the best answers in the training
    # data of both routes; pairs built, DPO started from implicit-sft, the targets too (train.start)
    report = json.loads((run / "pairs" / "report.json").read_text())
    assert pipeline["implicit"]["pairs"] == report["pairs"] > 0
    assert report["answers"] == 8 * 2 * 3 and set(report["per_model"]) == {"pivot", "describer", "converter"}
    prepared = json.loads((run / "prepared" / "manifest.json").read_text())
    assert prepared["counts"]["kept"] == 21 + report["sft"]
    assert "starting from the implicit route's implicit-sft" in (run / "targets" / "describer" / "README.md").read_text()
    dpo = json.loads((run / "targets" / "implicit-dpo" / "manifest.json").read_text())
    assert dpo["steps"] == 2 and dpo["start"] == str(run / "targets" / "implicit-sft")
    assert "Implicit fusion:" in (tmp_path / "eval" / "results.md").read_text()
