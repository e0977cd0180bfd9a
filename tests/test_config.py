from pathlib import Path

import pytest
import yaml

from fusechat.cli import main
from fusechat.config import RunConfig, load_config
from fusechat.errors import ConfigError
from fusechat.pipeline import load_run, require_runnable, run_problems

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "fusechat-7b-varm.yaml"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    return path


def base_lines(tmp_path, data_file):
    """A valid config, one YAML line per list item; line N of the file is item N-1."""
    return [
        f"run_dir: {tmp_path / 'run'}",  # 1
        "pivot:",  # 2
        "  name: pivot",  # 3
        "  path: hub:org/pivot-model",  # 4
        "sources:",  # 5
        "  - name: src",  # 6
        "    path: hub:org/source-model",  # 7
        "data:",  # 8
        f"  paths: [{data_file}]",  # 9
        "prepare:",  # 10
        "  template: openchat",  # 11
        "  max_length: 512",  # 12
        "train:",  # 13
        "  lambda: 0.9",  # 14
        "  epochs: 2",  # 15
    ]


def write(tmp_path, lines, name="run.yaml"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def config_lines(tmp_path, data_file):
    return base_lines(tmp_path, data_file)


def problems_of(path, **kw):
    """What a stage command reports: the config's own problems, else what a run of it lacks."""
    with pytest.raises(ConfigError) as exc:
        load_run(path, **kw)
    return exc.value.problems


def only_problem(path, **kw):
    problems = problems_of(path, **kw)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------ the paper's config


def test_paper_config_validates_with_the_papers_settings():
    cfg = load_config(PAPER_CONFIG)
    assert isinstance(cfg, RunConfig)
    assert cfg.pivot.path == "openchat/openchat_3.5"
    assert [s.path for s in cfg.sources] == [
        "NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO",
        "NousResearch/Nous-Hermes-2-SOLAR-10.7B",
    ]
    assert len({cfg.pivot.name, *(s.name for s in cfg.sources)}) == 3
    assert cfg.prepare.template == "openchat"
    assert cfg.prepare.max_length == 2048
    assert cfg.represent.top_k == 10
    assert cfg.fuse.method == "min_ce"
    assert cfg.train.lambda_ == 0.9
    assert cfg.train.epochs == 3
    assert cfg.train.learning_rate == 5e-6
    assert cfg.train.lr_scheduler == "cosine"
    assert cfg.train.warmup_ratio == 0.03
    assert cfg.train.weight_decay == 0
    assert cfg.train.global_batch_size == 128
    assert cfg.train.bf16 is True
    assert cfg.merge.method == "varm" and cfg.merge.params == {"varm": {"granularity": "matrix", "variation": "square"}}


def test_paper_config_round_trips_through_yaml():
    cfg = load_config(PAPER_CONFIG)
    again = RunConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert yaml.safe_load(cfg.to_yaml())["train"]["lambda"] == 0.9


def test_base_config_is_valid(tmp_path, config_lines, data_file):
    cfg = load_config(write(tmp_path, config_lines))
    assert cfg.data.paths == [str(data_file)]
    assert cfg.prepare.max_length == 512
    assert cfg.train.epochs == 2
    assert cfg.data.on_bad_record == "error"


# ------------------------------------------------------------------ validation messages


def test_unknown_key_names_closest_key_and_line(tmp_path, config_lines):
    config_lines[13] = "  lamda: 0.5"
    problem = only_problem(write(tmp_path, config_lines))
    assert "train.lamda" in problem
    assert "unknown key" in problem
    assert "did you mean 'lambda'" in problem
    assert problem.startswith("line 14:")


def test_unknown_key_in_a_list_item(tmp_path, config_lines):
    config_lines[6] = "    pth: org/source-model"
    problems = problems_of(write(tmp_path, config_lines))
    unknown = [p for p in problems if "unknown key" in p]
    assert len(unknown) == 1
    assert unknown[0].startswith("line 7:")
    assert "sources[0].pth" in unknown[0]
    assert "did you mean 'path'" in unknown[0]
    assert len(problems) == 1


def test_a_model_without_path_gguf_or_zoo_is_named(tmp_path, config_lines):
    config_lines[6] = "    revision: main"
    problem = only_problem(write(tmp_path, config_lines))
    assert "sources[0]" in problem and "needs `path` (a folder, or a hub id with `hub`), `gguf`" in problem


def test_unknown_top_level_section(tmp_path, config_lines):
    config_lines += ["trian:", "  epochs: 1"]
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 16:")
    assert "trian: unknown key (did you mean 'train'?)" in problem


def test_unknown_key_with_no_close_match_lists_valid_keys(tmp_path, config_lines):
    config_lines.append("  zzzzzz: 1")
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 16:")
    assert "train.zzzzzz: unknown key" in problem
    assert "valid keys:" in problem
    assert "lambda" in problem and "learning_rate" in problem


def test_wrong_type(tmp_path, config_lines):
    config_lines[11] = '  max_length: "long"'
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 12:")
    assert "prepare.max_length" in problem
    assert "integer" in problem
    assert "'long'" in problem


def test_missing_required_pivot(tmp_path, config_lines):
    del config_lines[1:4]
    problem = only_problem(write(tmp_path, config_lines))
    assert problem == "pivot: required key is missing"


def test_missing_data_file(tmp_path, config_lines):
    missing = tmp_path / "nowhere" / "train.jsonl"
    config_lines[8] = f"  paths: [{missing}]"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem == f"data.paths[0]: file not found: {missing}"


def test_missing_second_data_file_is_named_by_index(tmp_path, config_lines, data_file):
    missing = tmp_path / "extra.json"
    config_lines[8] = f"  paths: [{data_file}, {missing}]"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem == f"data.paths[1]: file not found: {missing}"


def test_hub_dataset_id_is_not_a_missing_file(tmp_path, config_lines):
    config_lines[8] = "  paths: [FuseAI/FuseChat-Mixture]"
    cfg = load_config(write(tmp_path, config_lines))
    assert cfg.data.paths == ["FuseAI/FuseChat-Mixture"]


def test_missing_local_model_folder(tmp_path, config_lines):
    missing = tmp_path / "models" / "pivot"
    config_lines[3] = f"  path: {missing}"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem == f"pivot.path: folder not found: {missing}"


def test_missing_relative_source_folder(tmp_path, config_lines):
    config_lines[6] = "    path: ./no-such-models/src"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem == "sources[0].path: folder not found: ./no-such-models/src"


def test_model_path_that_is_a_file(tmp_path, config_lines, data_file):
    config_lines[3] = f"  path: {data_file}"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("pivot.path:")
    assert "is a file" in problem


def test_all_missing_paths_reported_at_once(tmp_path, config_lines):
    config_lines[3] = f"  path: {tmp_path / 'p'}"
    config_lines[6] = f"    path: {tmp_path / 's'}"
    config_lines[8] = f"  paths: [{tmp_path / 'd.jsonl'}]"
    problems = problems_of(write(tmp_path, config_lines))
    assert problems == [
        f"data.paths[0]: file not found: {tmp_path / 'd.jsonl'}",
        f"pivot.path: folder not found: {tmp_path / 'p'}",
        f"sources[0].path: folder not found: {tmp_path / 's'}",
    ]


def test_a_valid_config_with_missing_files_validates_and_says_what_a_run_lacks(tmp_path, config_lines):
    config_lines[3] = f"  path: {tmp_path / 'p'}"
    cfg = load_config(write(tmp_path, config_lines))  # valid as a config
    assert run_problems(cfg) == [f"pivot.path: folder not found: {tmp_path / 'p'}"]
    with pytest.raises(ConfigError) as exc:
        require_runnable(cfg, source="run.yaml")
    assert str(exc.value).startswith("run.yaml: not ready to run (1 problem(s)):")


def test_validate_prints_the_config_and_apart_what_a_run_lacks(tmp_path, config_lines, capsys):
    from fusechat.cli import main

    config_lines[3] = f"  path: {tmp_path / 'p'}"
    path = write(tmp_path, config_lines)
    with pytest.raises(SystemExit) as done:
        main(["validate", str(path)])
    assert done.value.code == 0
    out, err = capsys.readouterr()
    assert "run_dir:" in out and "folder not found" not in out
    assert "valid config" in err
    assert f"To run it, this machine still needs:\n  - pivot.path: folder not found: {tmp_path / 'p'}" in err
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(path)])
    assert done.value.code == 1
    assert "not ready to run" in capsys.readouterr().err


def test_duplicate_source_names(tmp_path, config_lines):
    config_lines[7:7] = ["  - name: src", "    path: org/other-model"]
    problem = only_problem(write(tmp_path, config_lines))
    assert "sources[1].name 'src'" in problem
    assert "unique" in problem


def test_source_named_like_the_pivot(tmp_path, config_lines):
    config_lines[5] = "  - name: pivot"
    problem = only_problem(write(tmp_path, config_lines))
    assert "sources[0].name 'pivot'" in problem
    assert "pivot's name" in problem


def test_unknown_template(tmp_path, config_lines):
    config_lines[10] = "  template: openchatt"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 11:")
    assert "prepare.template" in problem
    assert "unknown template 'openchatt'" in problem
    assert "did you mean 'openchat'" in problem


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_lambda_outside_unit_interval(tmp_path, config_lines, value):
    config_lines[13] = f"  lambda: {value}"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 14:")
    assert "train.lambda" in problem
    assert value in problem


@pytest.mark.parametrize("value", ["0", "1", "0.0", "1.0"])
def test_lambda_bounds_are_inclusive(tmp_path, config_lines, value):
    config_lines[13] = f"  lambda: {value}"
    assert load_config(write(tmp_path, config_lines)).train.lambda_ == float(value)


def test_bad_model_name(tmp_path, config_lines):
    config_lines[5] = "  - name: my source"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("line 6:")
    assert "sources[0].name" in problem
    assert "'my source'" in problem


def test_several_problems_in_one_error(tmp_path, config_lines):
    config_lines[13] = "  lambda: 2"  # line 14
    config_lines[11] = "  max_length: long"  # line 12
    config_lines[10] = "  template: nope"  # line 11
    config_lines.append("  lamda: 0.5")  # line 16
    del config_lines[1:4]  # no pivot; later lines move up by 3
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, config_lines))
    problems = exc.value.problems
    assert len(problems) == 5
    expected = [
        ("pivot: required key is missing", None),
        ("prepare.template", "line 8:"),
        ("prepare.max_length", "line 9:"),
        ("train.lambda:", "line 11:"),
        ("train.lamda: unknown key (did you mean 'lambda'?)", "line 13:"),
    ]
    for fragment, line in expected:
        matching = [p for p in problems if fragment in p]
        assert len(matching) == 1, (fragment, problems)
        if line:
            assert matching[0].startswith(line), matching[0]
    message = str(exc.value)
    assert "5 problem(s)" in message
    assert all(p in message for p in problems)


def test_config_file_not_found(tmp_path):
    assert only_problem(tmp_path / "absent.yaml") == "config file not found"


def test_yaml_syntax_error_names_the_line(tmp_path, config_lines):
    config_lines[11] = "  max_length: 512: 1024"
    problem = only_problem(write(tmp_path, config_lines))
    assert "not valid YAML" in problem
    assert problem.startswith("line 12,")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "top level must be a mapping" in only_problem(path)


# ------------------------------------------------------------------ --set overrides


def test_override_nested_key(tmp_path, config_lines):
    cfg = load_config(write(tmp_path, config_lines), overrides=["prepare.max_length=1024", "data.on_bad_record=skip"])
    assert cfg.prepare.max_length == 1024
    assert cfg.data.on_bad_record == "skip"


def test_override_section_absent_from_the_file(tmp_path, config_lines):
    cfg = load_config(write(tmp_path, config_lines), overrides=["merge.method=ties"])
    assert cfg.merge.method == "ties"


def test_override_list_item_by_index(tmp_path, config_lines):
    cfg = load_config(write(tmp_path, config_lines), overrides=["sources.0.path=org/replacement"])
    assert cfg.sources[0].path == "org/replacement"
    assert cfg.sources[0].name == "src"


def test_override_list_item_by_name(tmp_path, config_lines):
    config_lines[7:7] = ["  - name: solar", "    path: hub:org/solar"]
    cfg = load_config(
        write(tmp_path, config_lines), overrides=["sources.solar.path=org/solar-2", "sources.src.revision=v1"]
    )
    assert [(s.name, s.path, s.revision) for s in cfg.sources] == [
        ("src", "org/source-model", "v1"),
        ("solar", "org/solar-2", None),
    ]


def test_override_value_is_parsed_as_yaml(tmp_path, config_lines):
    path = write(tmp_path, config_lines)
    cfg = load_config(path, overrides=["train.lambda=0.5", "train.bf16=true", "train.epochs=1"])
    assert cfg.train.lambda_ == 0.5
    assert isinstance(cfg.train.lambda_, float)
    assert cfg.train.bf16 is True
    raw = yaml.safe_load(cfg.to_yaml())
    assert raw["train"]["lambda"] == 0.5


def test_override_list_value(tmp_path, config_lines, data_file):
    other = tmp_path / "more.jsonl"
    other.write_text("")
    cfg = load_config(write(tmp_path, config_lines), overrides=[f"data.paths=[{data_file}, {other}]"])
    assert cfg.data.paths == [str(data_file), str(other)]


def test_override_does_not_touch_the_file(tmp_path, config_lines):
    path = write(tmp_path, config_lines)
    before = path.read_text()
    load_config(path, overrides=["train.lambda=0.5"])
    assert path.read_text() == before
    assert load_config(path).train.lambda_ == 0.9


def test_override_of_unknown_key(tmp_path, config_lines):
    problem = only_problem(write(tmp_path, config_lines), overrides=["train.lamda=0.5"])
    assert "train.lamda: unknown key (did you mean 'lambda'?)" in problem


def test_override_value_is_validated(tmp_path, config_lines):
    problem = only_problem(write(tmp_path, config_lines), overrides=["train.lambda=3"])
    assert "train.lambda" in problem


def test_override_unknown_list_item(tmp_path, config_lines):
    path = write(tmp_path, config_lines)
    assert "no item 'nope' in sources" in only_problem(path, overrides=["sources.nope.path=x/y"])
    assert "no item '1' in sources" in only_problem(path, overrides=["sources.1.path=x/y"])


def test_override_without_equals_sign(tmp_path, config_lines):
    problem = only_problem(write(tmp_path, config_lines), overrides=["train.lambda"])
    assert "expected key.sub=value" in problem


def test_override_below_a_scalar(tmp_path, config_lines):
    problem = only_problem(write(tmp_path, config_lines), overrides=["train.lambda.x=1"])
    assert "train.lambda is not a section" in problem


# ------------------------------------------------------------------ CLI


def cli(*argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def flat(text):
    return " ".join(text.split())


def test_cli_validate_prints_resolved_yaml(tmp_path, config_lines, data_file, capsys):
    assert cli("validate", write(tmp_path, config_lines)) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["pivot"] == {"name": "pivot", "path": "org/pivot-model", "hub": True, "gguf": None, "zoo": None, "skills": [], "revision": None,
                            "trust_remote_code": False}
    assert out["data"]["paths"] == [str(data_file)]
    assert out["data"]["on_bad_record"] == "error"
    assert out["prepare"]["max_length"] == 512
    assert out["train"]["lambda"] == 0.9
    assert out["train"]["epochs"] == 2.0
    assert out["represent"]["top_k"] == 10
    assert {k: out["merge"][k] for k in ("method", "baselines", "params")} == {
        "method": "varm", "baselines": [], "params": {}}


def test_cli_validate_applies_set(tmp_path, config_lines, capsys):
    code = cli("validate", write(tmp_path, config_lines), "--set", "train.lambda=0.25", "--set", "sources.src.path=o/m")
    assert code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["lambda"] == 0.25
    assert out["sources"][0]["path"] == "o/m"


def test_cli_validate_paper_config(capsys):
    assert cli("validate", PAPER_CONFIG) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["pivot"]["path"] == "openchat/openchat_3.5"
    assert out["fuse"]["method"] == "min_ce"


def test_cli_invalid_config_exits_1_with_message(tmp_path, config_lines, capsys):
    config_lines[13] = "  lamda: 0.5"
    path = write(tmp_path, config_lines)
    assert cli("validate", path) == 1
    captured = capsys.readouterr()
    err = flat(captured.err)
    assert "error:" in err
    assert str(path) in err
    assert "line 14: train.lamda: unknown key (did you mean 'lambda'?)" in err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""


def test_cli_invalid_config_in_a_stage_command(tmp_path, config_lines, capsys):
    config_lines[8] = f"  paths: [{tmp_path / 'gone.jsonl'}]"
    assert cli("prepare", write(tmp_path, config_lines)) == 1
    captured = capsys.readouterr()
    assert f"data.paths[0]: file not found: {tmp_path / 'gone.jsonl'}" in flat(captured.err)
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_cli_bad_set_exits_1(tmp_path, config_lines, capsys):
    assert cli("validate", write(tmp_path, config_lines), "--set", "train.lamda=0.5") == 1
    err = flat(capsys.readouterr().err)
    assert "did you mean 'lambda'" in err
    assert "Traceback" not in err


def test_cli_missing_config_file_exits_1(tmp_path, capsys):
    assert cli("validate", tmp_path / "absent.yaml") == 1
    assert "config file not found" in flat(capsys.readouterr().err)


# ------------------------------------------------------------------ names and paths a run must not trust


def test_set_with_invalid_yaml_is_a_clean_error(tmp_path, config_lines, capsys):
    path = write(tmp_path, config_lines)
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides=["data.paths=[/x.jsonl"])
    assert "--set 'data.paths=[/x.jsonl': the value is not valid YAML" in str(exc.value)
    assert cli("validate", path, "--set", "data.paths=[/x.jsonl") == 1
    captured = capsys.readouterr()
    assert "not valid YAML" in flat(captured.err) and "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("name", ["sft", "multi", "varm", "ties", "task_arithmetic"])
def test_reserved_source_names_are_rejected(tmp_path, config_lines, name):
    config_lines[5] = f"  - name: {name}"
    problem = only_problem(write(tmp_path, config_lines))
    assert f"sources[0].name {name!r} is reserved" in problem


@pytest.mark.parametrize("name", ["implicit-sft", "implicit-dpo"])
def test_the_implicit_targets_names_are_reserved(tmp_path, config_lines, name):
    config_lines[5] = f"  - name: {name}"
    assert only_problem(write(tmp_path, config_lines)) == (
        f"sources[0].name {name!r} is reserved: it names the implicit route's {name[9:].upper()} target "
        f"(targets/{name}); choose another name")


def test_every_merge_method_is_a_reserved_name(tmp_path, config_lines):
    import fusechat.merge  # noqa: F401  (registers every method)
    from fusechat.merge.registry import METHODS

    # The merge registry is the one list of merge names: each is refused when the run loads.
    assert {"varm", "sce", "linear", "task_arithmetic", "ties", "dare", "slerp", "karcher"} <= set(METHODS)
    for name in METHODS:
        config_lines[5] = f"  - name: {name}"
        assert only_problem(write(tmp_path, config_lines)) == (
            f"sources[0].name {name!r} is reserved: it names the {name} merge (merged/{name}); choose another name")


def test_the_configs_template_names_are_the_built_in_templates():
    import typing

    from fusechat.config import TEMPLATE_NAMES, GGUFSource
    from fusechat.data.templates import BUILTIN_TEMPLATES

    assert set(TEMPLATE_NAMES) == set(BUILTIN_TEMPLATES)
    annotation = GGUFSource.model_fields["chat_template"].annotation
    assert set(typing.get_args(typing.get_args(annotation)[0])) == set(BUILTIN_TEMPLATES)


def test_a_missing_relative_path_with_one_slash_is_not_a_hub_id(tmp_path, config_lines, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_lines[3] = "  path: models/llama"
    problem = only_problem(write(tmp_path, config_lines))
    assert problem.startswith("pivot.path: folder not found: models/llama")
    assert "hub: true" in problem  # the way to say it is a hub id


def test_a_hub_id_is_used_when_asked_for(tmp_path, config_lines):
    config_lines[3] = "  path: models/llama"
    config_lines.insert(4, "  hub: true")
    cfg = load_run(write(tmp_path, config_lines))
    assert (cfg.pivot.path, cfg.pivot.hub) == ("models/llama", True)
    assert (cfg.sources[0].path, cfg.sources[0].hub) == ("org/source-model", True)  # written hub:org/source-model


def test_hub_goes_with_a_hub_id_only(tmp_path, config_lines):
    config_lines[3] = "  path: ./models/llama"
    config_lines.insert(4, "  hub: true")
    assert "`path` must be a hub id" in only_problem(write(tmp_path, config_lines))


@pytest.mark.parametrize("target", ["../..", "missing", "../src"])
def test_merge_targets_must_be_targets_of_the_run(tmp_path, config_lines, target):
    config_lines += ["merge:", f"  targets: [src, {target!r}]"]
    problem = only_problem(write(tmp_path, config_lines))
    assert f"merge.targets[1] {target!r} is not a target of this run" in problem


def test_merge_targets_may_name_the_baselines(tmp_path, config_lines):
    config_lines += ["merge:", "  targets: [src, sft, multi]"]
    assert load_config(write(tmp_path, config_lines)).merge.targets == ["src", "sft", "multi"]
