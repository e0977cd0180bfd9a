"""Stage 2, represent: what every model predicts on the prepared conversations.

For the pivot and each source, the prepared text is read with the model's own
tokenizer (each model's own eos token where the template wrote ``{eos}``), run
through the model in batches, and stored per token as the top-k next-token
logits and ids, and per sequence as the mean cross-entropy on assistant tokens
(the MinCE metric). Output: ``<run_dir>/represent/<model>/shard-*.parquet`` and
a manifest (format in ``fusechat.shards``).

Top-k and cross-entropy are taken on the model's device; only (B, T, k) tensors
come back to the host. Under ``accelerate launch`` each process takes every
N-th shard; shards are the unit of resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusechat.config import ModelSpec, RunConfig, stable_hash
from fusechat.data.masks import assistant_token_mask
from fusechat.distributed import process_state
from fusechat.errors import FusechatError
from fusechat.model_loading import (
    device_map_for,
    load_causal_lm,
    load_tokenizer,
    model_hash,
    tokenizer_hash,
)
from fusechat.prepare import load_prepared
from fusechat.progress import console, progress_bar, summary_table
from fusechat.rundir import RunDir, is_complete, new_manifest, read_manifest, write_manifest
from fusechat.shards import (
    SequenceRep,
    id_dtype,
    shard_files,
    shard_meta,
    shard_name,
    shard_problem,
    write_shard,
)

CE_CHUNK_ROWS = 1024  # rows of (N, V) logits upcast to fp32 at a time when computing cross-entropy


# ---------------------------------------------------------------- pure functions


def model_view(text: str, eos_spans, eos_token: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The prepared text as a model reads it: its own eos token at every ``eos_spans`` place.

    Returns ``(model_text, start_map, end_map)``: a token spanning ``[s, e)`` of
    ``model_text`` spans ``[start_map[s], end_map[e])`` of the prepared text. A
    replaced eos maps as a whole onto the prepared eos span.
    """
    n = len(text)
    pieces, starts, ends = [], [], []
    pos = 0
    for s, e in eos_spans:
        pieces += [text[pos:s], eos_token]
        starts += [np.arange(pos, s), np.full(len(eos_token), s)]
        ends += [np.arange(pos + 1, s + 1), np.full(len(eos_token), e)]
        pos = e
    pieces.append(text[pos:n])
    starts.append(np.arange(pos, n))
    ends.append(np.arange(pos + 1, n + 1))
    start_map = np.concatenate([*starts, [n]]).astype(np.int64)  # position len(model_text) maps to the end
    end_map = np.concatenate([[0], *ends]).astype(np.int64)
    return "".join(pieces), start_map, end_map


def to_prepared_offsets(offsets: np.ndarray, start_map: np.ndarray, end_map: np.ndarray) -> np.ndarray:
    """(T, 2) model-text offsets → prepared-text offsets; empty spans stay empty."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start = start_map[offsets[:, 0]]
    end = np.where(offsets[:, 1] > offsets[:, 0], end_map[offsets[:, 1]], start)
    return np.stack([start, end], axis=1)


def topk_and_ce(logits, input_ids, target_mask, k: int, vocab_limit: int):
    """Top-k logits and summed cross-entropy, on the logits' device.

    logits: (B, T, V); input_ids: (B, T); target_mask: (B, T) bool, True where
    token t is an assistant token (so position t - 1 is scored on it).
    ``vocab_limit`` excludes padded embedding rows past the tokenizer from the top-k.
    Returns topk_values (B, T, k), topk_ids (B, T, k), ce_sum (B,) fp32, ce_count (B,).
    """
    import torch
    import torch.nn.functional as F

    topk_values, topk_ids = logits[..., :vocab_limit].topk(k, dim=-1)
    targets_mask = target_mask[:, 1:]
    batch_index = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(targets_mask)[targets_mask]
    scored = logits[:, :-1][targets_mask]  # (N, V)
    targets = input_ids[:, 1:][targets_mask]  # (N,)
    ce_sum = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, scored.shape[0], CE_CHUNK_ROWS):
        ce = F.cross_entropy(scored[a : a + CE_CHUNK_ROWS].float(), targets[a : a + CE_CHUNK_ROWS], reduction="none")
        ce_sum.index_add_(0, batch_index[a : a + CE_CHUNK_ROWS], ce)
    return topk_values, topk_ids, ce_sum, targets_mask.sum(dim=1)


# ---------------------------------------------------------------- encoding


@dataclass
class Encoded:
    seq: int
    id: str
    input_ids: np.ndarray
    offsets: np.ndarray  # in prepared-text coordinates
    assistant_mask: np.ndarray
    assistant_bytes: int
    model_text: str


def encode_rows(tokenizer, rows: dict, first_seq: int, eos_token: str, add_special_tokens: bool) -> list[Encoded]:
    """Tokenize a batch of prepared rows (a dict of columns) with one model's tokenizer."""
    views = [model_view(t, eos, eos_token) for t, eos in zip(rows["text"], rows["eos_spans"])]
    enc = tokenizer([v[0] for v in views], add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    verbose=False)
    out = []
    for i, (model_text, start_map, end_map) in enumerate(views):
        offsets = to_prepared_offsets(enc["offset_mapping"][i], start_map, end_map)
        spans = rows["assistant_spans"][i]
        text = rows["text"][i]
        out.append(Encoded(
            seq=first_seq + i,
            id=rows["id"][i],
            input_ids=np.asarray(enc["input_ids"][i], dtype=np.int64),
            offsets=offsets,
            assistant_mask=assistant_token_mask(offsets, spans),
            assistant_bytes=sum(len(text[s:e].encode("utf-8")) for s, e in spans),
            model_text=model_text,
        ))
    return out


def declared_unicode_forms(tokenizer) -> list[str]:
    """Unicode normal forms (NFC, NFKC, ...) that the tokenizer's normalizer applies."""
    import json

    normalizer = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer"))
    return [form for form in ("NFKC", "NFKD", "NFC", "NFD") if f'"type": "{form}"' in normalizer]


def check_decoding(tokenizer, encoded: list[Encoded], model_name: str) -> None:
    """The model must see the prepared text: decoding its tokens gives the text back.

    Whitespace is ignored (tokenizers differ in how they write spaces), and so is a
    Unicode normalisation the tokenizer declares; anything else (unknown tokens,
    lowercasing, dropped characters) means the model would read another text.
    """
    import unicodedata

    forms = declared_unicode_forms(tokenizer)
    for e in encoded:
        real = e.offsets[:, 1] > e.offsets[:, 0]  # leave out tokens the tokenizer added (bos)
        decoded = tokenizer.decode(e.input_ids[real].tolist(), skip_special_tokens=False)
        text = e.model_text
        for form in forms:
            text = unicodedata.normalize(form, text)
        a, b = "".join(text.split()), "".join(decoded.split())
        if a != b:
            i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
            raise FusechatError(
                f"model {model_name!r}: its tokenizer does not reproduce the prepared text of sequence {e.id!r}: "
                f"the text has {a[max(0, i - 20):i + 20]!r}, the decoded tokens {b[max(0, i - 20):i + 20]!r} "
                f"(first difference at non-space character {i}). Unknown characters or normalisation change the text."
            )


# ---------------------------------------------------------------- the model pass


class Representer:
    """Batched forward passes of one model over encoded sequences."""

    def __init__(self, model, tokenizer, top_k: int, batch_size: int, padding_side: str = "right"):
        self.model = model
        self.top_k = top_k
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_limit = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
        self.id_dtype = id_dtype(self.vocab_limit)
        self.device = next(model.parameters()).device
        config = model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def run(self, encoded: list[Encoded]) -> list[SequenceRep]:
        if self.max_positions:
            longest = max(encoded, key=lambda e: len(e.input_ids), default=None)
            if longest is not None and len(longest.input_ids) > self.max_positions:
                raise FusechatError(
                    f"sequence {longest.id!r} is {len(longest.input_ids)} tokens long for {self.model.name_or_path}, "
                    f"more than its {self.max_positions} positions; lower prepare.max_length"
                )
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))  # less padding per batch
        reps: dict[int, SequenceRep] = {}
        for a in range(0, len(order), self.batch_size):
            batch = [encoded[i] for i in order[a : a + self.batch_size]]
            for rep in self.forward(batch):
                reps[rep.seq] = rep
        return [reps[e.seq] for e in encoded]

    def forward(self, batch: list[Encoded]) -> list[SequenceRep]:
        import torch

        lengths = [len(e.input_ids) for e in batch]
        T = max(lengths)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), T), dtype=torch.long)
        target = torch.zeros((len(batch), T), dtype=torch.bool)
        for b, e in enumerate(batch):
            sl = slice(0, lengths[b]) if self.padding_side == "right" else slice(T - lengths[b], T)
            ids[b, sl] = torch.from_numpy(e.input_ids)
            attention[b, sl] = 1
            target[b, sl] = torch.from_numpy(e.assistant_mask)
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        ids, attention, target, position_ids = (t.to(self.device) for t in (ids, attention, target, position_ids))
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits
            values, topk_ids, ce_sum, ce_count = topk_and_ce(logits, ids, target, self.top_k, self.vocab_limit)
            values = values.to(torch.float16)
            finite_values = (values.isfinite() | (attention[..., None] == 0)).flatten(1).all(dim=1)
        values, topk_ids = values.cpu().numpy(), topk_ids.cpu().numpy()
        ce_sum, ce_count, finite_values = ce_sum.cpu().numpy(), ce_count.cpu().numpy(), finite_values.cpu().numpy()
        out = []
        for b, e in enumerate(batch):
            sl = slice(0, lengths[b]) if self.padding_side == "right" else slice(T - lengths[b], T)
            n = int(ce_count[b])
            ce = float(ce_sum[b] / n) if n else 0.0
            out.append(SequenceRep(
                seq=e.seq, id=e.id, input_ids=e.input_ids.astype(self.id_dtype), offsets=e.offsets,
                assistant_mask=e.assistant_mask, topk_ids=topk_ids[b, sl].astype(self.id_dtype),
                topk_logits=values[b, sl], ce=ce, assistant_tokens=n, assistant_bytes=e.assistant_bytes,
                finite=bool(finite_values[b]) and bool(np.isfinite(ce)),
            ))
        return out


# ---------------------------------------------------------------- the stage


def model_fingerprint(cfg: RunConfig, spec: ModelSpec, tok_hash: str, prepared_fp: str) -> str:

    payload = {
        "prepared": prepared_fp, "path": spec.path, "revision": spec.revision, "model": model_hash(spec),
        "tokenizer": tok_hash, "top_k": cfg.represent.top_k, "dtype": cfg.represent.dtype,
    }
    return stable_hash(payload)


def run(cfg: RunConfig, force: bool = False, model: str | None = None) -> list[Path]:
    """Represent every model of the run (or the one named ``model``)."""
    specs = [cfg.model(model)] if model else cfg.models
    return [represent_model(cfg, spec, force) for spec in specs]


def represent_model(cfg: RunConfig, spec: ModelSpec, force: bool = False) -> Path:
    import shutil


    state = process_state(cfg.represent.device)
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("represent", spec.name)
    prepared = load_prepared(cfg)
    prepared_manifest = read_manifest(rundir.stage("prepare"))
    tokenizer = load_tokenizer(spec)
    tok_hash = tokenizer_hash(tokenizer)
    fingerprint = model_fingerprint(cfg, spec, tok_hash, prepared_manifest["fingerprint"])
    if is_complete(out, fingerprint, force, label=f"represent {spec.name}"):
        return out
    if cfg.represent.top_k > len(tokenizer):
        raise FusechatError(
            f"model {spec.name!r}: represent.top_k = {cfg.represent.top_k} is larger than its vocabulary "
            f"({len(tokenizer)} tokens)"
        )
    eos_token = tokenizer.eos_token or prepared_manifest["eos_token"]
    add_special = prepared_manifest["add_special_tokens"]
    check = encode_rows(tokenizer, prepared[: cfg.represent.check_sequences], 0, eos_token, add_special)
    check_decoding(tokenizer, check, spec.name)

    n = len(prepared)
    size = cfg.represent.shard_size
    num_shards = (n + size - 1) // size
    if state.is_main_process:
        old = read_manifest(out)
        if force or (old is not None and old.get("fingerprint") != fingerprint):
            if old is not None and not force:
                console.print(f"represent {spec.name}: {out} holds shards of other inputs or settings; starting fresh")
            shutil.rmtree(out, ignore_errors=True)  # output of other inputs: never mix shards
        out.mkdir(parents=True, exist_ok=True)
        _drop_damaged_shards(out, n, size, spec.name, announce=not (old or {}).get("complete"))
        manifest = new_manifest(
            "represent", fingerprint, model=spec.name, path=spec.path, revision=spec.revision,
            model_hash=model_hash(spec), tokenizer_hash=tok_hash, prepared_fingerprint=prepared_manifest["fingerprint"],
            vocab_size=len(tokenizer), top_k=cfg.represent.top_k,
            dtype=cfg.represent.dtype, num_sequences=n, shard_size=size, num_shards=num_shards,
        )
        write_manifest(out, manifest)
    state.wait_for_everyone()

    done = shard_files(out)
    todo = [i for i in range(num_shards) if i % state.num_processes == state.process_index and i not in done]
    tokens_this_run, elapsed = 0, 0.0
    if todo:
        lm = load_causal_lm(spec, cfg.represent.dtype, device_map_for(cfg.represent.device, "represent.device",
                                                                      state.num_processes, state.device))
        rep = Representer(lm, tokenizer, cfg.represent.top_k, cfg.represent.batch_size, cfg.represent.padding_side)
        started = time.time()
        tokens_this_run = _run_shards(rep, tokenizer, prepared, todo, size, out, eos_token, add_special, spec.name,
                                      state)
        elapsed = time.time() - started
        del lm
    tokens_this_run = _sum_over_processes(tokens_this_run, state)
    if state.is_main_process:
        _finish_manifest(out, num_shards, tokens_this_run, elapsed, spec.name, state.num_processes)
    state.wait_for_everyone()
    return out


def _drop_damaged_shards(out: Path, n: int, size: int, name: str, announce: bool) -> None:
    """Delete shard files that are torn, of the wrong length or beyond the last shard, so that they are redone."""
    num_shards = (n + size - 1) // size
    for i, path in shard_files(out).items():
        problem = "beyond the last shard" if i >= num_shards else shard_problem(path, min(size, n - i * size))
        if problem:
            if announce:
                console.print(f"represent {name}: {path} is damaged ({problem}); redoing it")
            path.unlink()


def _sum_over_processes(value: int, state) -> int:
    """Sum of an int over all processes (a barrier too)."""
    if state.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long, device=state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def _run_shards(rep: Representer, tokenizer, prepared, todo, size, out, eos_token, add_special, name, state) -> int:
    from rich.progress import TextColumn


    total_seqs = sum(min(size, len(prepared) - i * size) for i in todo)
    tokens = sequences = 0
    started = time.time()
    with progress_bar(TextColumn("{task.fields[speed]}")) as bar:
        label = f"represent {name}" + (f" [{state.process_index}]" if state.num_processes > 1 else "")
        task = bar.add_task(label, total=total_seqs, speed="")
        for shard in todo:
            a, b = shard * size, min((shard + 1) * size, len(prepared))
            encoded = encode_rows(tokenizer, prepared[a:b], a, eos_token, add_special)
            reps = []
            for i in range(0, len(encoded), rep.batch_size * 4):
                chunk = rep.run(encoded[i : i + rep.batch_size * 4])
                reps += chunk
                tokens += sum(len(r.input_ids) for r in chunk)
                sequences += len(chunk)
                elapsed = max(time.time() - started, 1e-9)
                bar.update(task, advance=len(chunk),
                           speed=f"{sequences / elapsed:.1f} seq/s {tokens / elapsed:,.0f} tok/s")
            meta = {
                "shard": shard, "sequences": len(reps), "tokens": int(sum(len(r.input_ids) for r in reps)),
                "nonfinite": int(sum(not r.finite for r in reps)),
                "assistant_tokens": int(sum(r.assistant_tokens for r in reps)),
            }
            write_shard(out / shard_name(shard), reps, meta)
    return tokens


def _finish_manifest(out: Path, num_shards: int, tokens_this_run: int, elapsed: float, name: str,
                     num_processes: int) -> None:
    files = shard_files(out)
    missing = [i for i in range(num_shards) if i not in files]
    if missing:
        raise FusechatError(f"represent {name}: shards {missing[:10]} are missing after the run; rerun to resume")
    metas = [shard_meta(p) for _, p in sorted(files.items())]
    manifest = read_manifest(out)
    bytes_on_disk = sum(p.stat().st_size for p in files.values())
    tokens = sum(m["tokens"] for m in metas)
    manifest.update(
        num_processes=num_processes,
        sequences_done=sum(m["sequences"] for m in metas),
        tokens=tokens,
        assistant_tokens=sum(m["assistant_tokens"] for m in metas),
        nonfinite_sequences=sum(m["nonfinite"] for m in metas),
        bytes_on_disk=bytes_on_disk,
        bytes_per_token=round(bytes_on_disk / max(tokens, 1), 2),
        elapsed_s=round(elapsed, 3),
        tokens_per_s=round(tokens_this_run / elapsed, 1) if elapsed > 0 and tokens_this_run else None,
        shards={p.name: m["sequences"] for (_, p), m in zip(sorted(files.items()), metas)},
        complete=True,
    )
    write_manifest(out, manifest)
    console.print(summary_table(f"represent {name} → {out}", [
        ("sequences", manifest["sequences_done"]),
        ("tokens", tokens),
        ("non-finite sequences", manifest["nonfinite_sequences"]),
        ("bytes per token", manifest["bytes_per_token"]),
        ("tokens/s (this run)", manifest["tokens_per_s"] or "-"),
    ]))
