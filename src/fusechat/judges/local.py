"""A Hugging Face chat model as judge, run here."""

from __future__ import annotations

from fusechat.errors import FusechatError
from fusechat.generation import ChatEncoder, generate_replies


class LocalJudge:
    """A Hugging Face chat model as judge: greedy replies through its own chat template, in batches."""

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        return generate_replies(self.model, self.tokenizer, self.encoder,
                                [self._supported(m) for m in conversations], self.max_new_tokens)

    def _supported(self, messages: list[dict]) -> list[dict]:
        """The conversation, with the system prompt put in front of the user's when the template has no system role."""
        try:
            self.encoder.render(messages, add_generation_prompt=True)
            return messages
        except FusechatError:
            system, user = messages
            return [{"role": "user", "content": f"{system['content']}\n\n{user['content']}"}]
