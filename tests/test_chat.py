"""`fusechat chat`: the session, the REPL and the command, on a tiny Llama."""

import io

import pytest
import torch
from conftest import CORPUS

from fusechat.chat import ChatSession, repl
from fusechat.cli import main

MAX_NEW = 12


def _build(out_dir, chat_template):
    from fusechat.zoo.architectures import build_model
    from fusechat.zoo.tokenizers import build_tokenizer

    tok = build_tokenizer("byte_bpe", CORPUS * 3, vocab_size=350, chat_template=chat_template)
    model = build_model("llama", tok, out_dir=out_dir, seed=3)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fusechat.data.templates import CHATML_JINJA

    out = tmp_path_factory.mktemp("chat") / "tiny-llama"
    model, tok = _build(out, CHATML_JINJA)
    return out, model, tok


def _session(tiny, **options):
    _, model, tok = tiny
    return ChatSession(model, tok, max_new_tokens=MAX_NEW, **options)


def _recording(session):
    """Keep every prompt the session renders for an answer."""
    prompts = []
    render = session.render

    def spy(messages=None):
        prompts.append(render(messages))
        return prompts[-1]

    session.render = spy
    return prompts


def test_message_prints_the_greedy_answer(tiny, capsys):
    folder, model, tok = tiny
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).lstrip()
    assert expected

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(folder), "--message", "hello", "--max-new-tokens", str(MAX_NEW)])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"


def test_repl_reset_forgets_the_first_turn(tiny):
    session = _session(tiny)
    prompts = _recording(session)
    stdout = io.StringIO()
    repl(session, stdin=io.StringIO("hi\n/reset\nhello\n/exit\n"), stdout=stdout)

    assert len(prompts) == 2
    assert "hi" in prompts[0]
    assert "hi" not in prompts[1] and "hello" in prompts[1]
    assert prompts[1] == session.render([{"role": "user", "content": "hello"}])
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[0]["content"] == "hello"
    assert "cleared" in stdout.getvalue()


def test_repl_multi_turn_keeps_both_turns(tiny):
    session = _session(tiny, system="Be brief.")
    prompts = _recording(session)
    stdout = io.StringIO()
    repl(session, stdin=io.StringIO("hi\n\nhello\n"), stdout=stdout)  # ends at end of input

    assert len(prompts) == 2
    first_answer = session.history[2]["content"]
    expected = session.render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "hello"},
    ])
    assert prompts[1] == expected
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert stdout.getvalue().count("assistant> ") == 2


def test_reset_keeps_the_system_prompt(tiny):
    session = _session(tiny, system="Be brief.")
    session.reply("hi")
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]


def test_stream_pieces_make_the_answer(tiny):
    session = _session(tiny)
    pieces = []
    answer = session.reply("hello there", stream=pieces.append)
    assert answer and len(pieces) > 1
    assert "".join(pieces) == answer


def test_sampling_runs(tiny):
    torch.manual_seed(0)
    answer = _session(tiny, temperature=0.8).reply("hello")
    assert isinstance(answer, str)


def test_tokenizer_without_template_falls_back_to_openchat(tmp_path, capsys):
    folder = tmp_path / "no-template"
    model, tok = _build(folder, chat_template=None)
    session = ChatSession(model, tok, max_new_tokens=MAX_NEW)
    assert session.uses_fallback_template
    assert session.render([{"role": "user", "content": "hi"}]).startswith("GPT4 Correct User: ")

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(folder), "--message", "hi", "--max-new-tokens", "4"])
    assert exit_info.value.code == 0
    assert "openchat" in capsys.readouterr().err


def test_missing_folder_is_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(missing), "--message", "hi"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert str(missing) in captured.err.replace("\n", "")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_unknown_device_is_an_error(tiny, capsys):
    folder, _, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(folder), "--device", "tpu", "--message", "hi"])
    assert exit_info.value.code == 1
    assert "tpu" in capsys.readouterr().err
