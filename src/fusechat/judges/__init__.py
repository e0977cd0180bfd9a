"""Judges: what rates an answer. A chat model run here (``local``) or behind an OpenAI-compatible
endpoint (``endpoint``); both answer ``complete(conversations) -> replies`` in batches of ``batch_size``.
MT-Bench's judgments and implicit fusion's judge scorer use them."""
