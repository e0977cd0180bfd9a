"""A chat model asked through its own template: prompts and answers as token ids, batched generation,
and the bits a model spends on a given answer.

Every prompt is the conversation rendered with the model's own chat template and its
generation prompt, so each model is asked the way it was trained to be asked. Bits are
counted per UTF-8 byte of the answer, which makes models with different tokenizers
comparable: a tokenizer that cuts the answer into more tokens does not pay more for it.
Every stage that makes a model answer (the pivot's answers, sampling, MT-Bench, the
judges) or scores answers (evaluation, merge analysis) goes through here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from fusechat.data.templates import FALLBACK_TEMPLATE, fallback_template
from fusechat.errors import FusechatError
from fusechat.progress import console

_warned: set[tuple[str, str]] = set()


class Answered(Protocol):
    """A conversation ending on a user turn (``messages``) and an answer to it (``answer``)."""

    messages: list[dict]
    answer: str


def _warn_once(tokenizer, what: str, message: str) -> None:
    key = (str(getattr(tokenizer, "name_or_path", "") or id(tokenizer)), what)
    if key not in _warned:
        _warned.add(key)
        console.print(f"[yellow]warning:[/yellow] {message}")


class ChatEncoder:
    """Token ids of prompts and answers as the tokenizer's chat template lays them out."""

    def __init__(self, tokenizer):

        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        builtin = fallback_template(tokenizer)
        self.template = builtin.jinja if builtin else None  # None: the tokenizer's own chat template
        if builtin:
            _warn_once(tokenizer, "template", f"{self.name} has no chat template; "
                                              f"using the built-in {FALLBACK_TEMPLATE} template")
        self.bos = self._bos_prefix()
        excluded = {tokenizer.unk_token_id, tokenizer.pad_token_id}
        specials = set(tokenizer.all_special_ids)
        specials |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.end_of_turn_ids = specials - excluded

    def _bos_prefix(self) -> list[int]:
        """``[bos]`` when the tokenizer adds one to plain text (chat templates then write none), else ``[]``."""
        tok = self.tokenizer
        if tok.bos_token_id is None:
            return []
        with_special = tok("x", add_special_tokens=True)["input_ids"]
        without = tok("x", add_special_tokens=False)["input_ids"]
        adds_bos = with_special[:1] == [tok.bos_token_id] and without[:1] != [tok.bos_token_id]
        return [tok.bos_token_id] if adds_bos else []

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises its own errors; the user needs which model
            raise FusechatError(f"{self.name}: cannot render a conversation with its chat template: {e}") from None

    def encode(self, text: str) -> list[int]:
        bos = self.bos if not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token)) else []
        return bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The question with the generation prompt: what the model sees before answering."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def answer_ids(self, messages: list[dict], answer: str) -> tuple[list[int], int]:
        """(ids, start): the conversation with the answer as an assistant turn; ``ids[start:]`` are scored.

        The scored tokens run from the end of the generation prompt through the
        first special token (eos, end of turn) after the answer; a template whose
        end-of-turn marker is plain text to this tokenizer is scored through the
        end of the rendered turn.
        """
        prompt = self.render(messages, add_generation_prompt=True)
        text = self.render([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not text.startswith(prompt):
            _warn_once(self.tokenizer, "prefix", f"{self.name}: the chat template renders the question "
                                                 "differently once answered; scoring the answer followed by eos")
            text = prompt + answer + (self.tokenizer.eos_token or "")
        answer_end = _answer_end(text, answer, len(prompt))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = next((i for i, (_, e) in enumerate(offsets) if e > len(prompt)), len(ids))
        end = self._turn_end(ids, offsets, start, answer_end, len(text.rstrip()))
        bos = self.bos if not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token)) else []
        if not bos and start == 0:
            raise FusechatError(f"{self.name}: the prompt renders to no token; cannot score the answer")
        return bos + ids[:end], len(bos) + start

    def _turn_end(self, ids: list[int], offsets: list, start: int, answer_end: int, text_end: int) -> int:
        for i in range(start, len(ids)):
            if ids[i] in self.end_of_turn_ids and offsets[i][0] >= answer_end:
                return i + 1
        last = max((i for i in range(start, len(ids)) if offsets[i][0] < text_end), default=len(ids) - 1)
        return last + 1


def _answer_end(text: str, answer: str, search_from: int) -> int:
    """Character position right after the answer in the rendered text (templates may trim it)."""
    for needle in (answer, answer.strip()):
        at = text.find(needle, search_from)
        if at >= 0:
            return at + len(needle)
    return search_from


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos and those of the model's generation config (e.g. an end-of-turn token)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def pad_id(tokenizer, stops: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops[0] if stops else 0


def batches(lengths: list[int], batch_size: int, max_cells: int | None = None, width: int = 1) -> Iterator[list[int]]:
    """Item indices in batches of similar length (less padding); every index once. With ``max_cells``, a batch
    also holds at most that many ``items × longest × width`` cells (one item at least): a model's full logits
    over a batch of long sequences and a large vocabulary would not fit in memory."""
    if batch_size < 1:
        raise FusechatError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        full = len(batch) == batch_size or (max_cells is not None and batch
                                            and (len(batch) + 1) * lengths[i] * width > max_cells)
        if full:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def pad_batch(seqs: list[list[int]], pad: int, side: str):
    """(ids, attention_mask), both ``[batch, longest]`` long tensors, padded on ``side``."""
    import torch

    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def context_length(model) -> int | None:
    """Positions the model can read, when its config says (learned position tables fail past it)."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def fit_to_context(prompts: list[list[int]], max_new_tokens: int, context: int | None) -> tuple[list[list[int]], int]:
    """Prompts and answer budget that fit the context: at most half of it for the answer, and a prompt too long
    for the rest keeps its last tokens (as FastChat does when it generates MT-Bench answers)."""
    if not context:
        return prompts, max_new_tokens
    max_new_tokens = min(max_new_tokens, context // 2)
    room = context - max_new_tokens
    return [p[-room:] for p in prompts], max_new_tokens


def greedy_until(model, prompts: list[list[int]], max_new_tokens: int, pad: int, batch_size: int,
                 finished: Callable[[list[int]], bool],
                 on_batch: Callable[[list[int], list[list[int]]], None] | None = None) -> list[list[int]]:
    """Greedy new tokens for each prompt, at most ``max_new_tokens``, until ``finished(new_ids)`` holds.

    The tokens are those of ``model.generate`` (greedy, left-padded batches); the difference
    is that a row leaves its batch the step it is finished, its cache rows dropped with it.
    ``generate`` keeps computing a finished row until the whole batch is done, so one long
    answer kept a batch of short ones at full width to its end (on two CPU cores a step of 16
    rows costs about twice a step of one). ``on_batch(indices, new_ids)`` after each batch.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    # transformers renamed ``past_key_values`` to ``cache`` within the versions fusechat supports.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[list[int]] = [[] for _ in prompts]
    for idx in batches([len(p) for p in prompts], batch_size):
        ids, mask = pad_batch([prompts[i] for i in idx], pad, "left")
        ids, mask = ids.to(model.device), mask.to(model.device)
        # Positions as generate counts them: from each row's first real token.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache(config=model.config)
        alive = list(idx)
        step_ids = ids
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
            chosen = logits.argmax(-1)
            for row, token in zip(alive, chosen.tolist()):
                out[row].append(token)
            keep = [k for k, row in enumerate(alive) if not finished(out[row])]
            if not keep:
                break
            if len(keep) < len(alive):
                rows = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(rows)
                mask, positions, chosen = mask[rows], positions[rows], chosen[rows]
                alive = [alive[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = chosen[:, None]
        if on_batch:
            on_batch(idx, [out[i] for i in idx])
    return out


def generate_answers(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None, temperature: float = 0.0) -> list[str]:
    """One answer per conversation (each ending on a user turn): new tokens up to the first stop token, special
    tokens skipped, stripped.

    Greedy unless ``temperature`` is above 0 (then sampled from the full distribution at that
    temperature; the caller seeds torch). Batches are left-padded so every prompt ends at the
    same column and the new tokens start together.
    """
    import torch
    from transformers import GenerationConfig

    encoder = ChatEncoder(tokenizer)
    prompts, max_new_tokens = fit_to_context([encoder.prompt_ids(m) for m in conversations], max_new_tokens,
                                             context_length(model))
    stops = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, stops)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {
        "do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=stops or None,
                              pad_token_id=pad, **sampling)
    answers = [""] * len(conversations)
    for idx in batches([len(p) for p in prompts], batch_size):
        ids, mask = pad_batch([prompts[i] for i in idx], pad, "left")
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=config)
        for row, i in zip(out[:, ids.shape[1]:].tolist(), idx):
            answers[i] = decode_answer(tokenizer, row, stops)
        if on_batch:
            on_batch(len(idx))
    return answers


def generate_replies(model, tokenizer, encoder: ChatEncoder, conversations: list[list[dict]], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One reply per conversation, all generated in one left-padded batch: greedy at temperature 0, else sampled
    at ``temperature`` (torch seeded with ``seed`` first). A reply runs up to the first stop token; special
    tokens are dropped and the text is stripped."""
    import torch
    from transformers import GenerationConfig

    stops = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, stops)
    options = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    prompts, max_new_tokens = fit_to_context([encoder.prompt_ids(m) for m in conversations], max_new_tokens,
                                             context_length(model))
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=stops or None,
                              pad_token_id=pad, **options)
    ids, mask = pad_batch(prompts, pad, "left")
    if temperature > 0:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=config)
    return [decode_answer(tokenizer, row, stops) for row in out[:, ids.shape[1]:].tolist()]


def decode_answer(tokenizer, new_ids: list[int], stops: list[int]) -> str:
    cut = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True).strip()


def answer_bits(model, tokenizer, items: Sequence[Answered], batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> list[tuple[float | None, int]]:
    """Per item: (bits, bytes) = (−log2 p(answer + end of turn | prompt), UTF-8 bytes of the answer).

    bits / bytes is the item's bits per byte. An item longer than the model's context
    (``max_position_embeddings``) is not scored: its bits are None.
    """
    encoder = ChatEncoder(tokenizer)
    bits = scored_bits(model, tokenizer, [encoder.answer_ids(it.messages, it.answer) for it in items], batch_size,
                       on_batch)
    return [(b, len(it.answer.encode("utf-8"))) for b, it in zip(bits, items)]


LOGIT_CELLS = 2**28  # a scoring batch's logits stay within 1 GiB in fp32 (Gemma-3's 262k vocabulary: 1,024 tokens)


def scored_bits(model, tokenizer, seqs: list[tuple[list[int], int]], batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> list[float | None]:
    """Per ``(ids, start)``: −log2 p(ids[start:] | ids[:start]), batched (right-padded) by length; None for a
    sequence longer than the model's context."""
    import torch

    pad = pad_id(tokenizer, stop_ids(model, tokenizer))
    out: list[float | None] = [None] * len(seqs)
    context = context_length(model)
    fits = [i for i, (ids, _) in enumerate(seqs) if not context or len(ids) <= context]
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in batches([len(seqs[i][0]) for i in fits], batch_size, LOGIT_CELLS, vocab):
        idx = [fits[j] for j in batch]
        ids, mask = pad_batch([seqs[i][0] for i in idx], pad, "right")
        # Logits only from the first position that predicts a scored token: the vocabulary projection of the
        # prompts' positions is wasted work (on a 262k vocabulary, more than the rest of a small model).
        first = max(0, min(seqs[i][1] for i in idx) - 1)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           logits_to_keep=ids.shape[1] - first).logits
        for row, i in enumerate(idx):
            tokens, start = seqs[i]
            out[i] = sequence_bits(logits[row], tokens, start, first)
        if on_batch:
            on_batch(len(idx))
    if on_batch and len(fits) < len(seqs):
        on_batch(len(seqs) - len(fits))
    return out


def sequence_bits(logits, tokens: list[int], start: int, first: int = 0) -> float:
    """−Σ log2 p(tokens[t] | tokens[:t]) for t ≥ start; ``logits[k]`` predicts the token after position
    ``first + k`` (``first`` < ``start``) and reaches at least position ``len(tokens) - 2``."""
    import torch

    logp = logits[start - 1 - first:len(tokens) - 1 - first].float().log_softmax(-1)
    target = torch.tensor(tokens[start:], dtype=torch.long, device=logp.device)
    nats = -logp.gather(-1, target[:, None]).sum().item()
    return nats / math.log(2)
