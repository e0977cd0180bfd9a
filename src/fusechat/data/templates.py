"""Chat templates that render a conversation to text *and* say where the assistant content is.

The rendered text and its character spans are the contract between stages: every
model later reads the same text with its own tokenizer, and the assistant spans
decide which tokens carry loss. Built-in templates write ``{eos}`` where each
model's own end-of-sequence token goes (the FuseChat paper renders every model's
input with the OpenChat template this way); those places are recorded as
``eos_spans`` so another model can put its own token there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusechat.data.conversations import BadRecord, Message
from fusechat.errors import FusechatError

EOS = "{eos}"
Span = tuple[int, int]


@dataclass
class Rendered:
    text: str
    # What the model writes after the generation prompt: content + closing end-of-turn marker
    assistant_spans: list[Span] = field(default_factory=list)
    eos_spans: list[Span] = field(default_factory=list)  # where the model's own eos token stands


@dataclass(frozen=True)
class BuiltinTemplate:
    """A template given as literal pieces. ``{content}`` is the message; ``{eos}`` the model's eos token.

    The assistant turn is ``assistant_prefix + content + assistant_end + assistant_after``;
    the content and ``assistant_end`` carry loss, the rest does not, except the end of
    ``assistant_prefix`` that the generation prompt leaves out (OpenChat's space after
    ``Assistant:``): at inference the model writes it, so it is trained to.
    """

    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant_end: str
    assistant_after: str
    generation_prompt: str
    jinja: str = ""  # the same template for a tokenizer's chat_template (saved with trained models)
    add_special_tokens: bool = True  # let the tokenizer add its bos: the template writes none

    def written_by_model(self) -> int:
        """Characters at the end of ``assistant_prefix`` past the generation prompt."""
        prompt, prefix = self.generation_prompt, self.assistant_prefix
        return len(prefix) - len(prompt) if prefix.startswith(prompt) and EOS not in prefix else 0

    def render(self, messages: list[Message], eos_token: str, add_generation_prompt: bool = False) -> Rendered:
        out = _Builder(eos_token)
        for m in messages:
            if m.role == "system":
                out.add_pattern(self.system, m.content)
            elif m.role == "user":
                out.add_pattern(self.user, m.content)
            else:
                out.add_pattern(self.assistant_prefix, "")
                start = out.length - self.written_by_model()
                out.add_literal(m.content)
                out.add_pattern(self.assistant_end, "")
                out.rendered.assistant_spans.append((start, out.length))
                out.add_pattern(self.assistant_after, "")
        if add_generation_prompt:
            out.add_pattern(self.generation_prompt, "")
        return out.finish()


class _Builder:
    def __init__(self, eos_token: str):
        self.eos_token = eos_token
        self.parts: list[str] = []
        self.length = 0
        self.rendered = Rendered("")

    def add_literal(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def add_pattern(self, pattern: str, content: str) -> None:
        # Split on {content} first so that a message containing "{eos}" stays literal text.
        for i, piece in enumerate(pattern.split("{content}")):
            if i:
                self.add_literal(content)
            for j, chunk in enumerate(piece.split(EOS)):
                if j:
                    self.rendered.eos_spans.append((self.length, self.length + len(self.eos_token)))
                    self.add_literal(self.eos_token)
                self.add_literal(chunk)

    def finish(self) -> Rendered:
        self.rendered.text = "".join(self.parts)
        return self.rendered


OPENCHAT_JINJA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + eos_token }}"
    "{% elif m['role'] == 'user' %}{{ 'GPT4 Correct User: ' + m['content'] + eos_token }}"
    "{% else %}{{ 'GPT4 Correct Assistant: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {t.name: t for t in (
    # OpenChat 3.5 as FastChat writes it (the FuseChat paper's template for every model).
    BuiltinTemplate("openchat", system="{content}{eos}", user="GPT4 Correct User: {content}{eos}",
                    assistant_prefix="GPT4 Correct Assistant: ", assistant_end="{eos}", assistant_after="",
                    generation_prompt="GPT4 Correct Assistant:", jinja=OPENCHAT_JINJA),
    BuiltinTemplate("chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                    user="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
                    assistant_end="<|im_end|>", assistant_after="\n", generation_prompt="<|im_start|>assistant\n",
                    jinja=CHATML_JINJA),
)}


class TemplateError(FusechatError):
    """A tokenizer's own chat template failed on a conversation (the message says why and what to use instead)."""


class TokenizerTemplate:
    """The tokenizer's own Jinja chat template, with assistant spans found by rendering prefixes.

    Rendering ``messages[:i]`` with a generation prompt gives the text before
    assistant turn ``i``; the content is found right after it, and the special
    token that follows the content (``<|im_end|>``, ``</s>``, ...) closes the span.
    Whitespace between the generation prompt and the content belongs to the span:
    at inference the model writes it.
    """

    name = "tokenizer"
    add_special_tokens = False  # chat templates write their own bos

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise FusechatError(
                f"the pivot tokenizer ({tokenizer.name_or_path}) has no chat template; "
                f"set prepare.template to one of: {', '.join(BUILTIN_TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.special = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
        self.special += sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content not in self.special},
            key=len,
            reverse=True,
        )

    def _apply(self, messages: list[Message], add_generation_prompt: bool) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2's own errors: the sandbox's SecurityError, raise_exception, undefined names
            raise TemplateError(
                f"the chat template of {self.tokenizer.name_or_path} cannot render this conversation "
                f"({type(e).__name__}: {e}); set prepare.template to a built-in template "
                f"({', '.join(BUILTIN_TEMPLATES)})"
            ) from None

    def render(self, messages: list[Message], eos_token: str, add_generation_prompt: bool = False) -> Rendered:
        text = self._apply(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            prefix = self._apply(messages[:i], add_generation_prompt=True)
            after_prompt = text.startswith(prefix)
            search_from = len(prefix) if after_prompt else (spans[-1][1] if spans else 0)
            start = text.find(m.content, search_from)
            content = m.content
            if start < 0:  # templates that trim content
                content = m.content.strip()
                start = text.find(content, search_from)
            if start < 0:
                raise BadRecord(
                    "template_changes_content",
                    f"the tokenizer's chat template changes the content of turn {i}; "
                    f"use a built-in template ({', '.join(BUILTIN_TEMPLATES)})",
                )
            end = start + len(content)
            if after_prompt and not text[len(prefix):start].strip():
                start = len(prefix)
            for tok in self.special:
                if text.startswith(tok, end):
                    end += len(tok)
                    break
            spans.append((start, end))
        return Rendered(text, spans, [])


def get_template(name: str, tokenizer=None):
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    raise FusechatError(f"unknown template {name!r}; use 'tokenizer' or one of: {', '.join(BUILTIN_TEMPLATES)}")


FALLBACK_TEMPLATE = "openchat"  # for a tokenizer without a chat template of its own


def fallback_template(tokenizer) -> BuiltinTemplate | None:
    """The built-in template to render with when ``tokenizer`` has no chat template, else None (its own)."""
    return None if getattr(tokenizer, "chat_template", None) else BUILTIN_TEMPLATES[FALLBACK_TEMPLATE]
