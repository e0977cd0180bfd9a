"""Stage 1, prepare: conversations → rendered text, assistant spans, pivot token ids and labels.

Output (``<run_dir>/prepared``) is a Hugging Face dataset saved to disk, one row
per block, with the columns of ``FEATURES``. The ``text`` and its spans are the
contract with later stages: every model reads this text with its own tokenizer.
Records dropped with ``on_bad_record: skip`` are listed with their file:line in
``skipped.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fusechat import pivot_answers
from fusechat.config import RunConfig, stable_hash
from fusechat.data.blocks import split_exchanges
from fusechat.data.conversations import BadRecord, Conversation, parse_record
from fusechat.data.masks import assistant_token_mask, labels_from_mask
from fusechat.data.readers import iter_records
from fusechat.data.templates import Rendered, TemplateError, get_template
from fusechat.errors import MAX_LISTED, DataError, FusechatError, listed
from fusechat.implicit.score import pairs_folder, pool_answers_file
from fusechat.model_loading import load_tokenizer, tokenizer_hash
from fusechat.pivot_answers import training_paths
from fusechat.progress import console, progress_bar, summary_table
from fusechat.rundir import RunDir, build_output, is_complete, read_manifest, require_complete, sha256_tree

SKIPPED_FILE = "skipped.jsonl"

MAX_LISTED_ERRORS = MAX_LISTED  # bad records an error lists by name


def features():
    import datasets

    span = datasets.List(datasets.Value("int32"), length=2)
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "origin": datasets.Value("string"),
            "text": datasets.Value("string"),
            "assistant_spans": datasets.List(span),
            "eos_spans": datasets.List(span),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "num_tokens": datasets.Value("int32"),
            "num_assistant_tokens": datasets.Value("int32"),
        }
    )


@dataclass
class PrepareStats:
    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    split: int = 0  # conversations cut into several blocks
    truncated: int = 0  # blocks whose single exchange exceeded max_length
    dropped_blocks: Counter = field(default_factory=Counter)  # reason -> count
    trailing_user_turns: int = 0
    rows: int = 0
    tokens: int = 0
    assistant_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "split": self.split,
            "truncated": self.truncated,
            "dropped_blocks": dict(self.dropped_blocks),
            "trailing_user_turns_dropped": self.trailing_user_turns,
            "rows": self.rows,
            "tokens": self.tokens,
            "assistant_tokens": self.assistant_tokens,
        }


class Preparer:
    """Renders and tokenizes conversations into rows; pure apart from the tokenizer."""

    def __init__(self, tokenizer, template, max_length: int, stats: PrepareStats | None = None):
        if tokenizer.eos_token is None:
            raise FusechatError(f"the pivot tokenizer ({tokenizer.name_or_path}) has no eos token; templates need one")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.stats = stats or PrepareStats()
        # No token covers more characters than its own string has (twice that, for normalisers that drop
        # characters), so a text longer than this cannot fit in max_length tokens: only this much of it is
        # ever tokenized, however long the record.
        longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.char_limit = 2 * max_length * max(longest_token, 1) + 64

    def _encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        enc = self.tokenizer(
            texts, add_special_tokens=self.template.add_special_tokens, return_offsets_mapping=True, verbose=False
        )
        return enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]

    def render(self, messages) -> Rendered:
        return self.template.render(messages, self.tokenizer.eos_token)

    def _render_conversation(self, conv: Conversation) -> Rendered:
        try:
            return self.render(conv.messages)
        except TemplateError as e:
            raise DataError(f"{conv.origin}: {e}") from None

    def rows(self, conversations: list[Conversation]) -> Iterator[dict]:
        rendered = [self._render_conversation(conv) for conv in conversations]
        short = [i for i, r in enumerate(rendered) if len(r.text) <= self.char_limit]
        encoded = dict(zip(short, zip(*self._encode([rendered[i].text for i in short])))) if short else {}
        for i, (conv, r) in enumerate(zip(conversations, rendered)):
            if i in encoded and len(encoded[i][0]) <= self.max_length:
                yield from self._finish(conv, conv.id, r, *encoded[i])
                continue
            blocks = split_exchanges(conv.system, conv.exchanges(), self._fits)
            if len(blocks) > 1:
                self.stats.split += 1
            for b, messages in enumerate(blocks):
                r = self.render(messages)
                (ids,), (offsets,) = self._encode([r.text[: self.char_limit]])
                if len(ids) > self.max_length or len(r.text) > self.char_limit:
                    r, ids, offsets = self._truncate(r, ids, offsets)
                    self.stats.truncated += 1
                block_id = f"{conv.id}#{b}" if len(blocks) > 1 else conv.id
                yield from self._finish(conv, block_id, r, ids, offsets)

    def _fits(self, messages) -> bool:
        text = self.render(messages).text
        if len(text) > self.char_limit:
            return False
        (ids,), _ = self._encode([text])
        return len(ids) <= self.max_length

    def _truncate(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]):
        """Cut text and tokens at a token boundary so that ``text`` still matches ``input_ids``
        (``ids``, ``offsets``: the tokens of the text or of its first ``char_limit`` characters)."""
        keep = self.max_length
        while keep > 0:
            cut = max((end for _, end in offsets[:keep]), default=0)
            text = r.text[:cut]
            new_ids, new_offsets = (x[0] for x in self._encode([text]))
            if len(new_ids) <= self.max_length:
                spans = [(s, min(e, cut)) for s, e in r.assistant_spans if s < cut]
                eos = [(s, e) for s, e in r.eos_spans if e <= cut]
                return Rendered(text, spans, eos), new_ids, new_offsets
            keep -= 1
        return Rendered(""), [], []

    def _finish(self, conv: Conversation, row_id: str, r: Rendered, ids, offsets) -> Iterator[dict]:
        mask = assistant_token_mask(offsets, r.assistant_spans)
        n_assistant = int(mask.sum())
        if n_assistant == 0:
            self.stats.dropped_blocks["no_assistant_tokens_after_truncation"] += 1
            return
        self.stats.rows += 1
        self.stats.tokens += len(ids)
        self.stats.assistant_tokens += n_assistant
        yield {
            "id": row_id,
            "origin": conv.origin,
            "text": r.text,
            "assistant_spans": [list(s) for s in r.assistant_spans],
            "eos_spans": [list(s) for s in r.eos_spans],
            "input_ids": list(ids),
            "labels": labels_from_mask(ids, mask),
            "num_tokens": len(ids),
            "num_assistant_tokens": n_assistant,
        }


def prepare_paths(cfg: RunConfig, gold_only: bool = False) -> list[str]:
    """What prepare reads: the gold data (``data.paths`` and the pivot's answers), then, with a prompt pool, each
    pool prompt's best answer (the score stage's SFT set)."""
    pool = [] if gold_only or not cfg.pool_paths() else [str(pool_answers_file(cfg))]
    return [*training_paths(cfg), *pool]


def iter_conversations(cfg: RunConfig, stats: PrepareStats, gold_only: bool = False
                       ) -> Iterator[Conversation | BadRecord]:
    """Every record of every data file, parsed; bad ones come back as ``BadRecord``."""
    pool = str(pool_answers_file(cfg))
    for path in prepare_paths(cfg, gold_only):
        fmt = "openai" if path == pool else cfg.data.format  # the SFT set is written in OpenAI's format
        for where, record in iter_records(path, cfg.data.split):
            stats.records += 1
            if isinstance(record, BadRecord):
                yield record
                continue
            try:
                yield parse_record(record, fmt, where, stats.records - 1)
            except BadRecord as bad:
                yield bad


def gold_rows(cfg: RunConfig, tokenizer) -> tuple[list[dict], str]:
    """The gold training conversations (``data.paths``, the pivot's answers) as training rows, through the run's
    template, and the fingerprint of what they are made from; bad records as ``data.on_bad_record`` says."""
    stats = PrepareStats()
    convs, bad = [], []
    for item in iter_conversations(cfg, stats, gold_only=True):
        (bad if isinstance(item, BadRecord) else convs).append(item)
    if bad and cfg.data.on_bad_record == "error":
        raise DataError(f"{len(bad)} bad record(s) in the training data:\n{listed([str(b) for b in bad])}\n"
                        "Fix them, or set data.on_bad_record: skip to drop and count them.")
    preparer = Preparer(tokenizer, get_template(cfg.prepare.template, tokenizer), cfg.prepare.max_length, stats)
    inputs = {p: (sha256_tree(p) if Path(p).exists() else "hub") for p in prepare_paths(cfg, gold_only=True)}
    return list(preparer.rows(convs)), stable_hash({"config": cfg.section_hash("data", "prepare"), "inputs": inputs})


def pooled_rows(cfg: RunConfig, prepared) -> set[int]:
    """Indices of the prepared rows made from the prompt pool's answers (none without a pool).

    A row's origin names the file as the prepare stage read it, so the rows are found through the path the
    prepare manifest recorded, not today's: a run folder moved or renamed since keeps its pool rows apart."""
    if not cfg.pool_paths():
        return set()
    folder = RunDir(cfg.run_dir).stage("prepare")
    record = (read_manifest(folder) or {}).get("pool_answers")
    if not record:
        raise FusechatError(f"{folder}: the prepared data does not say which rows came from the prompt pool's "
                            "answers (prepared before the pool was configured, or by an older fusechat); run "
                            "`fusechat prepare CONFIG --force`")
    found = {i for i, origin in enumerate(prepared["origin"]) if origin.startswith(f"{record['path']}:")}
    if len(found) != record["rows"]:
        raise FusechatError(f"{folder}: {len(found)} prepared row(s) come from {record['path']}, its manifest says "
                            f"{record['rows']}; run `fusechat prepare CONFIG --force`")
    return found


def check_records(cfg: RunConfig) -> tuple[int, list[BadRecord]]:
    """First pass: count the records and collect the bad ones, so errors are reported all at once."""
    stats = PrepareStats()
    bad = [c for c in iter_conversations(cfg, stats) if isinstance(c, BadRecord)]
    return stats.records, bad


def input_fingerprint(cfg: RunConfig, tok_hash: str) -> tuple[str, dict]:
    inputs = {p: (sha256_tree(p) if Path(p).exists() else "hub") for p in prepare_paths(cfg)}
    payload = {"config": cfg.section_hash("data", "prepare"), "tokenizer": tok_hash, "inputs": inputs}
    return stable_hash(payload), inputs


def run(cfg: RunConfig, force: bool = False) -> Path:
    """Prepare the run's conversations; skip when complete output from the same inputs exists."""
    import datasets
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    datasets.disable_progress_bars()  # fusechat draws its own

    pivot_answers.run(cfg, force)
    if cfg.pool_paths():
        require_complete(pairs_folder(cfg), "SFT set of the prompt pool's answers", "fusechat score CONFIG")
    out = RunDir(cfg.run_dir).stage("prepare")
    tokenizer = load_tokenizer(cfg.pivot)
    template = get_template(cfg.prepare.template, tokenizer)
    tok_hash = tokenizer_hash(tokenizer)
    fingerprint, inputs = input_fingerprint(cfg, tok_hash)
    if is_complete(out, fingerprint, force, label="prepare"):
        return out

    started = time.time()
    total, bad = check_records(cfg)
    if bad and cfg.data.on_bad_record == "error":
        raise DataError(
            f"{len(bad)} bad record(s) in the training data:\n{listed([str(b) for b in bad])}\n"
            "Fix them, or set data.on_bad_record: skip to drop and count them."
        )

    stats = PrepareStats()
    preparer = Preparer(tokenizer, template, cfg.prepare.max_length, stats)
    with build_output(out, "prepare", fingerprint, started) as building, progress_bar() as bar:
        tmp = building.folder
        task = bar.add_task("prepare", total=total)
        arrow_path = tmp / "rows.arrow.tmp"
        writer = ArrowWriter(features=features(), path=str(arrow_path))
        batch: list[Conversation] = []

        pool_prefix, pool_rows = f"{pool_answers_file(cfg)}:", 0

        def flush():
            nonlocal pool_rows
            rows = list(preparer.rows(batch))
            pool_rows += sum(r["origin"].startswith(pool_prefix) for r in rows)
            if rows:
                writer.write_batch({k: [r[k] for r in rows] for k in rows[0]})
            bar.advance(task, len(batch))
            batch.clear()

        with open(tmp / SKIPPED_FILE, "w", encoding="utf-8") as skipped:
            for item in iter_conversations(cfg, stats):
                if isinstance(item, BadRecord):
                    stats.skipped[item.reason] += 1
                    skipped.write(json.dumps({"where": item.where, "reason": item.reason, "message": item.message},
                                             ensure_ascii=False) + "\n")
                    bar.advance(task)
                    continue
                stats.kept += 1
                stats.trailing_user_turns += "trailing_user_turn" in item.notes
                batch.append(item)
                if len(batch) >= cfg.prepare.batch_size:
                    flush()
            if batch:
                flush()
        writer.finalize()
        if stats.rows == 0:
            raise DataError(f"no usable conversation in {', '.join(training_paths(cfg))} ({stats.records} records read)")
        Dataset.from_file(str(arrow_path)).save_to_disk(str(tmp / "dataset"))
        arrow_path.unlink()
        building.manifest.update(
            inputs=inputs,
            pivot={"name": cfg.pivot.name, "path": cfg.pivot.path, "tokenizer_hash": tok_hash},
            template=template.name,
            add_special_tokens=template.add_special_tokens,
            eos_token=tokenizer.eos_token,
            max_length=cfg.prepare.max_length,
            counts=stats.as_dict(),
            skipped_records=SKIPPED_FILE,
            pool_answers={"path": str(pool_answers_file(cfg)), "rows": pool_rows} if cfg.pool_paths() else None,
        )
    print_summary(stats, out)
    return out


def load_prepared(cfg: RunConfig):
    """The prepared dataset of a run (``datasets.Dataset``), or a clear error if prepare has not run."""
    from datasets import load_from_disk

    out = RunDir(cfg.run_dir).stage("prepare")
    require_complete(out, "prepared data", "fusechat prepare CONFIG")
    return load_from_disk(str(out / "dataset"))


def print_summary(stats: PrepareStats, out: Path) -> None:
    rows = [
        ("records read", stats.records),
        ("kept", stats.kept),
        ("skipped", sum(stats.skipped.values())),
        *[(f"  skipped: {reason}", n) for reason, n in sorted(stats.skipped.items())],
        ("split into blocks", stats.split),
        ("truncated", stats.truncated),
        *[(f"  dropped: {reason}", n) for reason, n in sorted(stats.dropped_blocks.items())],
        ("trailing user turns dropped", stats.trailing_user_turns),
        ("rows written", stats.rows),
        ("tokens", stats.tokens),
        ("assistant tokens", stats.assistant_tokens),
    ]
    console.print(summary_table(f"prepare → {out}", rows))
