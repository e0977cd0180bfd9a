"""Talking with a model: a multi-turn session rendered with the chat template, and a small REPL."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fusechat.data.templates import FALLBACK_TEMPLATE, fallback_template
from fusechat.errors import FusechatError
from fusechat.model_loading import (
    TORCH_DTYPES,
    device_map_for,
    load_causal_lm,
    load_tokenizer,
    row_spec,
)
from fusechat.progress import console

__all__ = ["FALLBACK_TEMPLATE", "ChatSession", "chat", "load_session", "repl"]
USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "
DEVICES = ("auto", "cpu", "cuda")


class ChatSession:
    """A conversation with one model: the history, rendered whole for every answer."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        builtin = fallback_template(tokenizer)
        self.uses_fallback_template = builtin is not None
        if builtin is not None:
            self.template, self.add_special_tokens = builtin.jinja, builtin.add_special_tokens
        else:
            # A tokenizer's own template writes its bos itself.
            self.template, self.add_special_tokens = None, False
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: list[dict[str, str]] | None = None) -> str:
        """The prompt for ``messages`` (the history by default), ending with the generation prompt."""
        try:
            return self.tokenizer.apply_chat_template(
                self.history if messages is None else messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # templates raise their own errors, e.g. for a system prompt they do not support
            raise FusechatError(f"the chat template cannot render this conversation: {e}") from None

    def reply(self, text: str, stream: Callable[[str], object] | None = None) -> str:
        """Answer ``text`` after the history, passing each decoded piece to ``stream``; returns the answer.

        The history is only extended once the answer is complete, so an interrupted
        answer leaves the conversation as it was.
        """
        import torch

        messages = [*self.history, {"role": "user", "content": text}]
        inputs = self.tokenizer(self.render(messages), return_tensors="pt", add_special_tokens=self.add_special_tokens)
        inputs = inputs.to(self.model.device)
        pieces: list[str] = []

        def collect(piece: str) -> None:
            if not pieces:
                # The generation prompt may end before the space that starts the answer.
                piece = piece.lstrip()
            if piece:
                pieces.append(piece)
                if stream is not None:
                    stream(piece)

        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                streamer=_streamer(self.tokenizer, collect),
                **self._sampling(),
                **self._stop_ids(),
            )
        answer = "".join(pieces)
        messages.append({"role": "assistant", "content": answer.strip()})
        self.history = messages
        return answer

    def _sampling(self) -> dict:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature}
        return {"do_sample": False}

    def _stop_ids(self) -> dict:
        """Stop at the tokenizer's eos and at any end-of-turn id the model's generation config adds."""
        eos = [self.tokenizer.eos_token_id]
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        eos += configured if isinstance(configured, list) else [configured]
        eos = list(dict.fromkeys(i for i in eos if i is not None))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if eos else None
        return {"eos_token_id": eos or None, "pad_token_id": pad}


def _streamer(tokenizer, callback: Callable[[str], None]):
    """A ``TextStreamer`` that hands each decoded piece to ``callback`` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def model_name(path: str) -> str:
    """A valid model name (it names nothing on disk here) from a folder or hub id."""
    p = Path(path)
    name = (p.resolve().name if p.exists() else p.name) or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name)
    return name if name[0].isalnum() else f"m{name}"


def load_session(path: str, device: str = "auto", dtype: str | None = None, **session_options) -> ChatSession:
    """Load the model and tokenizer at ``path`` (fp32 on CPU, bf16 on GPU unless ``dtype``)."""
    import transformers

    if device not in DEVICES:
        raise FusechatError(f"unknown device {device!r}; use one of: {', '.join(DEVICES)}")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise FusechatError(f"unknown dtype {dtype!r}; use one of: {', '.join(TORCH_DTYPES)}")
    transformers.utils.logging.set_verbosity_error()  # generation-config notices are noise in a chat
    device_map = device_map_for(device, "--device")
    spec = row_spec(model_name(path), path)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, dtype=dtype or ("fp32" if device_map == "cpu" else "bf16"), device_map=device_map)
    return ChatSession(model, tokenizer, **session_options)


def chat(path: str, message: str | None = None, device: str = "auto", dtype: str | None = None,
         **session_options) -> None:
    """``fusechat chat``: answer ``message`` and exit, or talk until /exit."""
    from rich.markup import escape

    session = load_session(path, device=device, dtype=dtype, **session_options)
    if session.uses_fallback_template:
        console.print(f"the tokenizer has no chat template; using the built-in {FALLBACK_TEMPLATE!r} template")
    if message is not None:
        session.reply(message, stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    console.print(
        f"chatting with {escape(path)}; /reset clears the conversation, /exit or Ctrl-D ends it", soft_wrap=True
    )
    repl(session)


def repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Read user lines and answer them until ``/exit``, end of input or Ctrl-C; ``/reset`` clears the history."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        read = _terminal_input
    else:
        read = _stream_input(stdin, stdout)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    try:
        while True:
            line = read(USER_PROMPT)
            if line is None:
                write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                return
            if text == "/reset":
                session.reset()
                write("(conversation cleared)\n")
                continue
            write(ASSISTANT_PROMPT)
            session.reply(text, stream=write)
            write("\n")
    except KeyboardInterrupt:
        write("\n")


def _terminal_input(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _stream_input(stdin: TextIO, stdout: TextIO) -> Callable[[str], str | None]:
    def read(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        return stdin.readline() or None

    return read
