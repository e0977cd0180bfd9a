"""Splitting long conversations at turn boundaries into blocks that fit the max length."""

from __future__ import annotations

from collections.abc import Callable

from fusechat.data.conversations import Message


def split_exchanges(
    system: list[Message], exchanges: list[list[Message]], fits: Callable[[list[Message]], bool]
) -> list[list[Message]]:
    """Greedily pack consecutive (user, assistant) exchanges into blocks for which ``fits`` holds.

    Each block starts with a user turn and repeats the system messages. A block
    always holds at least one exchange, so a single exchange that is too long on
    its own becomes a block by itself (the caller truncates it).
    """
    blocks: list[list[Message]] = []
    current: list[Message] = []
    for exchange in exchanges:
        if current and not fits(system + current + exchange):
            blocks.append(system + current)
            current = []
        current = current + exchange
    if current:
        blocks.append(system + current)
    return blocks
