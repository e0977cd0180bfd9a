"""The eval stage: items, exact match, bits per byte, batched generation, the report, the stage and the CLI."""

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import write_config, write_jsonl

from fusechat.cli import main
from fusechat.config import load_config
from fusechat.data.templates import BUILTIN_TEMPLATES
from fusechat.errors import DataError
from fusechat.evaluate import evaluate_models
from fusechat.evaluate import stage as eval_stage
from fusechat.evaluate.items import EvalItem, exact_match, load_items
from fusechat.evaluate.report import format_markdown, write_report
from fusechat.generation import ChatEncoder, answer_bits, generate_answers

QA = [
    ("What is two plus two?", "four"),
    ("Name the red planet.", "Mars"),
    ("Reverse the word cat.", "tac"),
    ("What is the capital of Zorvia?", "Mellport"),
]
OPENCHAT = BUILTIN_TEMPLATES["openchat"].jinja


def item(i, question, answer, skill="facts", kind="exact", system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return EvalItem(id=f"q{i}", skill=skill, kind=kind, messages=messages, answer=answer)


def record(it: EvalItem) -> dict:
    return {"id": it.id, "skill": it.skill, "kind": it.kind, "messages": it.messages, "answer": it.answer}


QA_ITEMS = [item(i, q, a, skill="arithmetic" if i == 0 else "facts") for i, (q, a) in enumerate(QA)]


def train_to_memorize(model, tokenizer, items, steps=120):
    """Plain next-token training on the items' full conversations until greedy decoding reproduces them."""
    from fusechat.generation import pad_batch

    encoder = ChatEncoder(tokenizer)
    seqs = [encoder.answer_ids(it.messages, it.answer)[0] for it in items]
    ids, mask = pad_batch(seqs, tokenizer.eos_token_id, "right")
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def qa_models(tmp_path_factory):
    """Two tiny Llamas with one byte-level tokenizer (OpenChat template): one trained on QA, one random."""
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("qa")
    texts = [f"{q} {a} café naïve" for q, a in QA] * 3 + ["GPT4 Correct User:", "GPT4 Correct Assistant:"]
    tokenizer = build_tokenizer("byte_bpe", texts, vocab_size=300, chat_template=OPENCHAT)
    trained = build_model("llama", tokenizer, seed=1, hidden=32, layers=2)
    loss = train_to_memorize(trained, tokenizer, QA_ITEMS)
    assert loss < 0.2
    trained.save_pretrained(str(root / "trained"))
    tokenizer.save_pretrained(str(root / "trained"))
    build_model("llama", tokenizer, out_dir=root / "random", seed=2, hidden=32, layers=2)
    data = write_jsonl(root / "items.jsonl", [record(it) for it in QA_ITEMS])
    return {"trained": root / "trained", "random": root / "random", "data": data,
            "model": trained, "tokenizer": tokenizer}


# ---------------------------------------------------------------- items and exact match


def test_exact_match_strips_surrounding_whitespace_only():
    assert exact_match("  four\n", "four")
    assert exact_match("four", " four ")
    assert not exact_match("Four", "four")
    assert not exact_match("four.", "four")
    assert not exact_match("fo ur", "four")
    assert not exact_match("", "four")


def test_load_items_reads_every_field(tmp_path):
    its = [item(0, "Q?", "A", system="Be brief."), item(1, "Name one colour.", "blue", skill="open",
                                                               kind="distribution")]
    path = write_jsonl(tmp_path / "items.jsonl", [record(it) for it in its] + [""])
    assert load_items(path) == its


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "skill": "s", ', "not valid JSON"),
    ({"id": "a", "skill": "s", "kind": "exact", "messages": [{"role": "user", "content": "q"}]}, "'answer' is missing"),
    ({"id": "a", "skill": "s", "kind": "exact", "answer": "x",
      "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
     "last message must be a user turn"),
    ({"id": "a", "skill": "s", "kind": "fuzzy", "answer": "x", "messages": [{"role": "user", "content": "q"}]},
     "'kind' must be one of exact, distribution"),
    ({"id": "a", "skill": "s", "kind": "exact", "answer": "x", "messages": [{"role": "human", "content": "q"}]},
     "'messages[0].role'"),
    ({"id": "a", "skill": "s", "kind": "exact", "answer": "", "messages": [{"role": "user", "content": "q"}]},
     "'answer' must be a non-empty string"),
    ({"id": "q0", "skill": "s", "kind": "exact", "answer": "x", "messages": [{"role": "user", "content": "q"}]},
     "id 'q0' is already used on line 1"),
])
def test_load_items_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "items.jsonl", [record(QA_ITEMS[0]), line])
    with pytest.raises(DataError) as e:
        load_items(path)
    assert f"{path}:2: " in str(e.value)
    assert message in str(e.value)


def test_load_items_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_items(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no evaluation items"):
        load_items(write_jsonl(tmp_path / "empty.jsonl", []))


# ---------------------------------------------------------------- metrics


def test_trained_model_scores_one_random_model_zero(qa_models):
    results = evaluate_models({"trained": str(qa_models["trained"]), "random": str(qa_models["random"])},
                              QA_ITEMS, max_new_tokens=8, batch_size=3)
    assert results["exact_match"]["trained"] == {"arithmetic": 1.0, "facts": 1.0, "average": 1.0}
    assert results["exact_match"]["random"] == {"arithmetic": 0.0, "facts": 0.0, "average": 0.0}
    bpb = results["bits_per_byte"]
    assert bpb["trained"]["average"] < 0.2 < 2.0 < bpb["random"]["average"]


def manual_bits(model, tokenizer, it: EvalItem) -> float:
    """−log2 p(answer tokens and the eos after them | prompt), by one forward pass over the whole conversation."""
    prompt = tokenizer.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*it.messages, {"role": "assistant", "content": it.answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids
    end = full_ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids[:end]])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nats = -sum(logp[t - 1, full_ids[t]].item() for t in range(len(prompt_ids), end))
    return nats / math.log(2)


def test_answer_bits_match_a_forward_pass_by_hand(qa_models):
    model, tokenizer = qa_models["model"], qa_models["tokenizer"]
    its = [*QA_ITEMS, item(9, "Which word has a diaeresis?", "naïve café", skill="open", kind="distribution",
                           system="Be brief.")]
    batched = answer_bits(model, tokenizer, its, batch_size=5)
    for it, (bits, n_bytes) in zip(its, batched):
        assert n_bytes == len(it.answer.encode("utf-8"))
        assert bits == pytest.approx(manual_bits(model, tokenizer, it), rel=1e-4)
    assert batched[-1][1] == len(its[-1].answer) + 2  # bytes, not characters: ï and é are two bytes each
    one_by_one = [answer_bits(model, tokenizer, [it], batch_size=1)[0] for it in its]
    assert [n for _, n in one_by_one] == [n for _, n in batched]
    assert [b for b, _ in one_by_one] == pytest.approx([b for b, _ in batched], rel=1e-5)
    results = evaluate_models({"trained": str(qa_models["trained"])}, its[-1:], batch_size=1)
    bits, n_bytes = batched[-1]
    assert results["bits_per_byte"]["trained"]["open"] == pytest.approx(bits / n_bytes, rel=1e-5)


def test_bits_project_only_the_positions_that_predict_the_answer(qa_models):
    model, tokenizer = qa_models["model"], qa_models["tokenizer"]
    encoder = ChatEncoder(tokenizer)
    seqs = [encoder.answer_ids(it.messages, it.answer) for it in QA_ITEMS[:2]]
    widths = []
    head = model.get_output_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        bits = answer_bits(model, tokenizer, QA_ITEMS[:2], batch_size=2)
    finally:
        head.remove()
    longest = max(len(ids) for ids, _ in seqs)
    assert widths == [longest - (min(start for _, start in seqs) - 1)]  # not the prompts' positions
    assert [b for b, _ in bits] == pytest.approx([manual_bits(model, tokenizer, it) for it in QA_ITEMS[:2]],
                                                 rel=1e-4)


def test_batches_keep_their_logits_within_a_budget():
    from fusechat.generation import batches

    lengths = [5, 1, 3, 4]  # sorted by length: items 1, 2, 3, 0
    assert list(batches(lengths, 3)) == [[1, 2, 3], [0]]
    assert list(batches(lengths, 3, max_cells=12)) == [[1, 2, 3], [0]]  # 3 items x 4 tokens = 12 cells
    assert list(batches(lengths, 3, max_cells=8)) == [[1, 2], [3], [0]]  # [1, 2, 3] would be 12
    assert list(batches(lengths, 3, max_cells=16, width=4)) == [[1], [2], [3], [0]]  # one item even past it


def test_bits_scored_under_a_small_logit_budget_are_the_same(qa_models, monkeypatch):
    import fusechat.generation as generation

    model, tokenizer = qa_models["model"], qa_models["tokenizer"]
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        plain = answer_bits(model, tokenizer, QA_ITEMS, batch_size=4)
        monkeypatch.setattr(generation, "LOGIT_CELLS", 1)  # one sequence per forward pass
        small = answer_bits(model, tokenizer, QA_ITEMS, batch_size=4)
    finally:
        hook.remove()
    assert calls == [4, 1, 1, 1, 1]
    assert [n for _, n in small] == [n for _, n in plain]
    assert [b for b, _ in small] == pytest.approx([b for b, _ in plain], rel=1e-5)


def test_scored_tokens_end_with_the_end_of_turn_token():
    from fusechat.data.templates import CHATML_JINJA
    from fusechat.zoo.tokenizers import build_tokenizer

    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"] * 3
    special = build_tokenizer("byte_bpe", texts, vocab_size=300, eos="<|im_end|>", bos=None,
                              chat_template=CHATML_JINJA, extra_special=("<|im_start|>",))
    plain = build_tokenizer("byte_bpe", texts, vocab_size=300, chat_template=CHATML_JINJA)
    messages = [{"role": "user", "content": "Hi"}]
    ids, start = ChatEncoder(special).answer_ids(messages, "Hello there")
    assert special.decode(ids[start:]) == "Hello there<|im_end|>"  # the "\n" after the turn is not scored
    ids, start = ChatEncoder(plain).answer_ids(messages, "Hello there")
    assert plain.decode(ids[start:]) == "Hello there<|im_end|>"  # an end-of-turn marker made of plain tokens


def test_no_chat_template_falls_back_to_openchat_with_one_warning(qa_models, capsys):
    tokenizer = qa_models["tokenizer"]
    bare = type(tokenizer).from_pretrained(str(qa_models["random"]))
    bare.chat_template = None
    bare.name_or_path = "bare-tokenizer"
    ChatEncoder(bare)
    ChatEncoder(bare)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("bare-tokenizer has no chat template; using the built-in openchat template") == 1
    encoder = ChatEncoder(bare)
    assert encoder.prompt_ids(QA_ITEMS[0].messages) == ChatEncoder(tokenizer).prompt_ids(QA_ITEMS[0].messages)


def test_left_padded_batches_generate_as_one_by_one(qa_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(qa_models["random"])).eval()
    tokenizer = qa_models["tokenizer"]
    its = [item(0, "Hi", "x"), item(1, "What is the capital of Zorvia, the green country?", "x"),
           item(2, "Name the red planet.", "x"), item(3, "Reverse the word cat, please, and then stop.", "x"),
           item(4, "Two?", "x")]
    assert len({len(ChatEncoder(tokenizer).prompt_ids(it.messages)) for it in its}) == len(its)
    batched = generate_answers(model, tokenizer, [it.messages for it in its], max_new_tokens=10, batch_size=5)
    single = [generate_answers(model, tokenizer, [it.messages], max_new_tokens=10, batch_size=1)[0] for it in its]
    assert batched == single
    assert any(batched)
    trained = generate_answers(qa_models["model"], tokenizer, [it.messages for it in QA_ITEMS], max_new_tokens=10, batch_size=2)
    assert trained == [it.answer for it in QA_ITEMS]  # stops at eos, decodes only the new tokens


def _greedy_model(arch, tokenizer):
    if arch != "gemma3":
        from fusechat.zoo.architectures import build_model

        return build_model(arch, tokenizer, seed=3, hidden=32, layers=2)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Gemma-3's alternating layers; a window shorter than the prompts so the sliding cache rolls over.
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_greedy_rows_leave_their_batch_when_finished_with_generates_tokens(qa_models, arch):
    from transformers import GenerationConfig

    from fusechat.generation import greedy_until, pad_batch

    tokenizer = qa_models["tokenizer"]
    model = _greedy_model(arch, tokenizer)
    encoder = ChatEncoder(tokenizer)
    questions = ["Hi", "What is the capital of Zorvia, the green country?", "Name the red planet.",
                 "Reverse the word cat, please, and then stop.", "Two?"]
    prompts = [encoder.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    ids, mask = pad_batch(prompts, 0, "left")
    config = GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        full = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:].tolist()

    assert greedy_until(model, prompts, 9, 0, 8, lambda new: False) == full

    # A row is finished once its new tokens sum to a multiple of 5: rows leave at different steps.
    def finished(new):
        return sum(new) % 5 == 0

    wanted = [next((t for t in range(1, 10) if finished(row[:t])), 9) for row in full]
    assert len(set(wanted)) > 1
    rows_per_forward = []
    hook = model.register_forward_pre_hook(lambda _, args, kw: rows_per_forward.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    seen = []
    new = greedy_until(model, prompts, 9, 0, 8, finished, on_batch=lambda idx, got: seen.append((idx, got)))
    hook.remove()
    assert new == [row[:n] for row, n in zip(full, wanted)]
    assert rows_per_forward == [sum(n >= step for n in wanted) for step in range(1, max(wanted) + 1)]
    assert [sorted(idx) for idx, _ in seen] == [list(range(5))] and [new[i] for i in seen[0][0]] == seen[0][1]


# ---------------------------------------------------------------- tables and report


def test_evaluate_models_schema_and_report(qa_models, tmp_path):
    its = [*QA_ITEMS, item(7, "Name a word with an accent.", "café", skill="open", kind="distribution")]
    models = {"random": str(qa_models["random"]), "trained": str(qa_models["trained"])}
    results = evaluate_models(models, its, max_new_tokens=8, batch_size=4)
    assert list(results) == ["exact_match", "bits_per_byte"]
    assert list(results["exact_match"]) == ["random", "trained"]
    assert list(results["bits_per_byte"]) == ["random", "trained"]
    for row in results["exact_match"].values():
        assert list(row) == ["arithmetic", "facts", "average"]  # "open" has no exact items
        assert row["average"] == pytest.approx((row["arithmetic"] + row["facts"]) / 2)
    for row in results["bits_per_byte"].values():
        assert list(row) == ["arithmetic", "facts", "open", "average"]
        assert row["average"] == pytest.approx(sum(row[s] for s in ("arithmetic", "facts", "open")) / 3)
    bits = answer_bits(qa_models["model"], qa_models["tokenizer"], its[1:4], batch_size=4)
    facts = sum(b for b, _ in bits) / sum(n for _, n in bits)  # total bits / total bytes, not a mean of ratios
    assert results["bits_per_byte"]["trained"]["facts"] == pytest.approx(facts, rel=1e-4)

    results["entropy_floor"] = {"arithmetic": 0.0, "facts": 0.0, "open": 1.25}
    results["source_skills"] = {"random": ["facts"]}
    write_report(results, tmp_path / "out", title="Tiny eval")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["entropy_floor"] == results["entropy_floor"] and saved["source_skills"] == {"random": ["facts"]}
    assert saved["exact_match"]["trained"]["average"] == 1.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert md == format_markdown(results, "Tiny eval")
    assert md.startswith("# Tiny eval")
    assert "| model | arithmetic | facts | average |" in md
    assert "| model | arithmetic | facts | open | average |" in md
    assert "| trained | 1.000 | 1.000 | 1.000 |" in md
    assert "| entropy floor | 0.000 | 0.000 | 1.250 | 0.417 |" in md
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_with_distribution_items_only(tmp_path):
    results = {"exact_match": {"a": {"average": None}}, "bits_per_byte": {"a": {"open": 1.5, "average": 1.5}}}
    write_report(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| a | – |" in md and "| a | 1.500 | 1.500 |" in md
    assert (tmp_path / "results.png").stat().st_size > 0


# ---------------------------------------------------------------- the stage


def complete_copy(src, dest, fingerprint="x"):
    shutil.copytree(src, dest)
    (dest / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": fingerprint}))


def test_stage_rows_files_and_skip(tmp_path, zoo, qa_models, monkeypatch, capsys):
    config = write_config(tmp_path, zoo, pivot="llama", sources=("mistral",),
                          eval={"data": [str(qa_models["data"])], "max_new_tokens": 4, "batch_size": 4},
                          merge={"method": "varm", "baselines": ["ties"]})
    cfg = load_config(config)
    run = tmp_path / "run"
    complete_copy(zoo["llama"], run / "targets" / "mistral")
    complete_copy(zoo["llama"], run / "targets" / "sft")
    shutil.copytree(zoo["llama"], run / "targets" / ".mistral.work")  # a training work folder
    shutil.copytree(zoo["llama"], run / "targets" / "gpt2")  # incomplete: no manifest
    complete_copy(zoo["llama"], run / "merged" / "varm")
    complete_copy(zoo["llama"], run / "merged" / "analysis")
    shutil.copytree(zoo["llama"], run / "merged" / "ties")  # incomplete

    out = eval_stage.run(cfg)
    assert out == run / "eval"
    results = json.loads((out / "results.json").read_text())
    rows = ["pivot", "mistral", "target-mistral", "sft", "varm"]
    assert list(results["exact_match"]) == rows and list(results["bits_per_byte"]) == rows
    assert results["models"]["pivot"] == str(zoo["llama"]) and results["models"]["varm"] == str(run / "merged" / "varm")
    assert results["items"] == {"arithmetic": 1, "facts": 3}
    md = (out / "results.md").read_text()
    assert "| target-mistral |" in md and "| model | arithmetic | facts | average |" in md
    assert (out / "results.png").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) * len(QA_ITEMS) and {"prediction", "correct", "bits"} <= set(predictions[0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["stage"] == "eval" and manifest["items"] == len(QA_ITEMS)
    assert "has no chat template; using the built-in openchat template" in " ".join(capsys.readouterr().err.split())

    def must_not_score(*args, **kwargs):
        raise AssertionError("a complete eval was redone")

    monkeypatch.setattr(eval_stage, "score_models", must_not_score)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config)])
    assert exit_info.value.code == 0
    assert "is complete, skipping" in " ".join(capsys.readouterr().err.split())

    (run / "merged" / "ties" / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": "y"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config)])
    assert exit_info.value.code == 1
    assert "Rerun with --force" in " ".join(capsys.readouterr().err.split())


def test_a_merge_of_targets_retrained_since_is_left_out_of_the_table(tmp_path, zoo, capsys):
    from fusechat.evaluate.rows import model_rows

    config = write_config(tmp_path, zoo, pivot="llama", sources=("mistral",),
                          merge={"method": "varm", "baselines": ["ties", "linear"]})
    run = tmp_path / "run"

    def manifest(folder, **fields):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"complete": True, **fields}))

    manifest(run / "targets" / "mistral", fingerprint="t2")  # retrained: t1 before
    manifest(run / "targets" / "sft", fingerprint="s1")
    manifest(run / "merged" / "varm", fingerprint="m1", target_fingerprints={"mistral": "t2", "sft": "s1"})
    manifest(run / "merged" / "ties", fingerprint="m2", target_fingerprints={"mistral": "t1", "sft": "s1"})
    manifest(run / "merged" / "linear", fingerprint="m3")  # made by a fusechat that did not record them: kept
    rows = model_rows(load_config(config))
    assert [r.name for r in rows] == ["pivot", "mistral", "target-mistral", "sft", "varm", "linear"]
    said = " ".join(capsys.readouterr().err.split())
    assert f"leaving out {run / 'merged' / 'ties'}: it was merged from other versions of mistral" in said


def test_stage_needs_eval_data(tmp_path, zoo, capsys):
    config = write_config(tmp_path, zoo)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config)])
    assert exit_info.value.code == 1
    assert "eval.data is empty" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- the CLI without a run


def test_cli_evaluates_model_folders(qa_models, tmp_path):
    out = tmp_path / "evalout"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--models", str(qa_models["trained"]), str(qa_models["random"]),
              "--data", str(qa_models["data"]), "--out", str(out)])
    assert exit_info.value.code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["exact_match"]) == ["trained", "random"]
    assert results["exact_match"]["trained"]["average"] == 1.0
    assert (out / "results.md").is_file() and (out / "results.png").is_file()


def test_cli_models_repeatable_with_eval_settings(qa_models, tmp_path, monkeypatch):
    seen = {}

    def fake(models, items, max_new_tokens, batch_size, device="cpu"):
        seen.update(models=models, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return {name: [{"id": it.id, "skill": it.skill, "kind": it.kind, "bits": 1.0, "bytes": 2, "correct": True}
                       for it in items] for name in models}

    monkeypatch.setattr(eval_stage, "score_models", fake)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--models", str(qa_models["trained"]), "--models", str(qa_models["random"]),
              "--data", str(qa_models["data"]), "--set", "eval.max_new_tokens=5", "--set", "eval.batch_size=2"])
    assert exit_info.value.code == 0
    assert seen == {"models": {"trained": str(qa_models["trained"]), "random": str(qa_models["random"])},
                    "max_new_tokens": 5, "batch_size": 2}
    results = json.loads((tmp_path / "fusechat-eval" / "results.json").read_text())
    assert results["bits_per_byte"]["random"]["average"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["eval"], "give exactly one of: a run CONFIG"),
    (["eval", "a.yaml", "--models", "m"], "not both"),
    (["eval", "--models", "m"], "--models needs --data"),
    (["eval", "a.yaml", "--data", "x.jsonl"], "--data and --out go with --models"),
    (["eval", "--models", "m", "--data", "x.jsonl", "--set", "train.lambda=1"], "only eval.* settings"),
])
def test_cli_eval_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert message in " ".join(capsys.readouterr().err.split())


def test_config_eval_section_is_documented_and_validated(tmp_path, zoo):
    config = write_config(tmp_path, zoo, eval={"batch_size": 0})
    with pytest.raises(Exception, match="eval.batch_size"):
        load_config(config)
    assert yaml.safe_load(load_config(write_config(tmp_path, zoo)).to_yaml())["eval"]["device"] == "cpu"


def test_prompts_are_fitted_to_the_context_as_fastchat_does():
    from fusechat.generation import fit_to_context

    prompts = [list(range(10)), list(range(3))]
    assert fit_to_context(prompts, 4, None) == (prompts, 4)
    assert fit_to_context(prompts, 4, 12) == ([list(range(2, 10)), [0, 1, 2]], 4)  # 8 prompt + 4 answer = 12
    assert fit_to_context(prompts, 100, 12) == ([list(range(4, 10)), [0, 1, 2]], 6)  # at most half for the answer
