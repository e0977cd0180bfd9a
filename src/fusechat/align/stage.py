"""Stage 3, align: each source's distributions moved onto the pivot's positions and vocabulary.

Per source: pass 1 aligns every sequence with the pivot's and counts which pivot
token starts where each source token starts (the statistics for the vocabulary
map); the map is built and saved; pass 2 projects the source's top-k
distributions onto the pivot. With the ``offsets`` method both tokenizations are
placed in bytes of the prepared text (``sequence.byte_spans``) and projection
uses exact spans first, byte prefixes otherwise (``project.project_spans``).
Output ``<run_dir>/align/<source>/``: ``vocab_map.npz``, ``shard-*.parquet``
(``AlignedRow``: ids, probs and status per pivot position, with the source's CE,
token and byte counts), ``manifest.json`` with the coverage (by how: exact,
prefix, fallback) and the count of every alignment case.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from fusechat.align.prefix import PrefixProjector, pivot_first_token
from fusechat.align.project import STATUS_NAMES, project, project_spans
from fusechat.align.sequence import (
    align_dtw,
    align_offsets,
    byte_spans,
    group_kinds,
    partial_tokens,
)
from fusechat.align.vocab import (
    SPECIAL,
    VocabMap,
    build_vocab_map,
    comparable,
    special_ids,
    token_texts,
)
from fusechat.config import ModelSpec, RunConfig, stable_hash
from fusechat.errors import FusechatError
from fusechat.model_loading import load_tokenizer
from fusechat.prepare import load_prepared
from fusechat.progress import console, progress_bar, summary_table
from fusechat.rundir import RunDir, build_output, is_complete, require_complete
from fusechat.shards import AlignedRow, ShardWriter, id_dtype, read_representation, write_aligned_shard


def complete_representation(cfg: RunConfig, spec: ModelSpec) -> tuple[Path, dict]:
    folder = RunDir(cfg.run_dir).stage("represent", spec.name)
    return folder, require_complete(folder, "representation", f"fusechat represent CONFIG --model {spec.name}")


def run(cfg: RunConfig, force: bool = False) -> list[Path]:
    return [align_source(cfg, spec, force) for spec in cfg.sources]


# Bumped when the same inputs give other output (2: byte-exact alignment, 3: AlignedRow shards, 4: prefix
# projection onto the token the pivot writes first).
ALIGN_VERSION = 4


class Aligner:
    """Sequence alignment and projection of one (pivot, source) pair with the configured method."""

    def __init__(self, method: str, pivot_tok=None, source_tok=None):
        self.method = method
        self.pivot_bytes = token_texts(pivot_tok)
        self.source_bytes = token_texts(source_tok)
        self.pivot_partial = partial_tokens(self.pivot_bytes)
        self.source_partial = partial_tokens(self.source_bytes)
        self.pivot_special = special_ids(pivot_tok)
        self.pivot_first_token = pivot_first_token(pivot_tok)
        self.prefix: PrefixProjector | None = None
        if method == "dtw":
            self.pivot_strings = [comparable(b) for b in self.pivot_bytes]
            self.source_strings = [comparable(b) for b in self.source_bytes]

    def spans(self, pivot_rep, source_rep, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(T, 2) and (S, 2) byte spans of both tokenizations in ``text``."""
        return (byte_spans(pivot_rep.offsets, text, pivot_rep.input_ids, self.pivot_bytes, self.pivot_partial),
                byte_spans(source_rep.offsets, text, source_rep.input_ids, self.source_bytes, self.source_partial))

    def groups(self, pivot_rep, source_rep, text: str) -> np.ndarray:
        if self.method == "offsets":
            return align_offsets(*self.spans(pivot_rep, source_rep, text))
        return align_dtw([self._s(self.pivot_strings, i) for i in pivot_rep.input_ids],
                         [self._s(self.source_strings, i) for i in source_rep.input_ids])

    def use_vocab_map(self, vocab_map: VocabMap) -> None:
        """Prefix projection, once the map gives the special tokens' counterparts."""
        if self.method != "offsets":
            return
        specials = np.flatnonzero(vocab_map.method == SPECIAL)
        self.prefix = PrefixProjector(self.pivot_bytes, self.source_bytes, self.pivot_special,
                                      {int(i): int(vocab_map.pivot_id[i]) for i in specials}, self.pivot_first_token)

    def project(self, pivot_rep, source_rep, text: str, vocab_map: VocabMap, unaligned: str):
        pivot_ids = pivot_rep.input_ids.astype(np.int64)
        if self.method == "offsets":
            p_spans, s_spans = self.spans(pivot_rep, source_rep, text)
            return project_spans(pivot_ids, pivot_rep.assistant_mask, p_spans, source_rep.input_ids.astype(np.int64),
                                 s_spans, source_rep.topk_ids, source_rep.topk_logits, vocab_map.pivot_id,
                                 self.prefix, text.encode("utf-8", "surrogatepass"), unaligned)
        return project(pivot_ids, pivot_rep.assistant_mask, self.groups(pivot_rep, source_rep, text),
                       source_rep.topk_ids, source_rep.topk_logits, vocab_map.pivot_id, unaligned)

    @staticmethod
    def _s(strings: list[str], i) -> str:
        return strings[i] if i < len(strings) else ""


def paired(pivot_dir: Path, source_dir: Path, source_name: str):
    """Both representations, sequence by sequence, checked to be of the same prepared rows."""
    pivot_iter, source_iter = read_representation(pivot_dir), read_representation(source_dir)
    for p in pivot_iter:
        s = next(source_iter, None)
        if s is None or s.seq != p.seq or s.id != p.id:
            raise FusechatError(f"the representations of the pivot and {source_name!r} do not cover the same "
                                f"sequences (at pivot sequence {p.id!r}); rerun represent for both")
        yield p, s


def align_source(cfg: RunConfig, spec: ModelSpec, force: bool = False) -> Path:
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("align", spec.name)
    pivot_dir, pm = complete_representation(cfg, cfg.pivot)
    source_dir, sm = complete_representation(cfg, spec)
    if pm.get("prepared_fingerprint") != sm.get("prepared_fingerprint"):
        raise FusechatError(
            f"the representations of the pivot and {spec.name!r} were made from different prepared data "
            f"(the text or template changed between them); rerun `fusechat represent CONFIG --model {spec.name}`"
        )
    payload = {"pivot": pm["fingerprint"], "source": sm["fingerprint"], "align": cfg.section_hash("align"),
               "version": ALIGN_VERSION}
    fingerprint = stable_hash(payload)
    if is_complete(out, fingerprint, force, label=f"align {spec.name}"):
        return out

    started = time.time()
    pivot_tok, source_tok = load_tokenizer(cfg.pivot), load_tokenizer(spec)
    aligner = Aligner(cfg.align.method, pivot_tok, source_tok)
    total = pm["num_sequences"]
    texts = list(load_prepared(cfg)["text"])

    # Pass 1: alignment statistics. Keys source_id * V_pivot + pivot_id, counted sparsely.
    pair_keys: list[np.ndarray] = []
    used_ids: list[np.ndarray] = []  # source ids in the top-k: the entries projection reads
    kinds: Counter = Counter()
    v_pivot = np.int64(max(len(pivot_tok), pm.get("vocab_size", 0)) + 1)
    with progress_bar() as bar:
        task = bar.add_task(f"align {spec.name}: statistics", total=total)
        for p, s in paired(pivot_dir, source_dir, spec.name):
            groups = aligner.groups(p, s, texts[p.seq])
            kinds.update(group_kinds(groups))
            both = (groups[:, 1] > groups[:, 0]) & (groups[:, 3] > groups[:, 2])
            first_p, first_s = groups[both, 0], groups[both, 2]
            pair_keys.append(s.input_ids[first_s].astype(np.int64) * v_pivot + p.input_ids[first_p].astype(np.int64))
            used_ids.append(np.unique(s.topk_ids))
            bar.advance(task)
    keys, counts = np.unique(np.concatenate(pair_keys) if pair_keys else np.zeros(0, np.int64), return_counts=True)
    pair_counts = {(int(k // v_pivot), int(k % v_pivot)): int(c) for k, c in zip(keys, counts)}
    used = np.unique(np.concatenate(used_ids)).astype(np.int64) if used_ids else np.zeros(0, np.int64)
    vocab_map = build_vocab_map(source_tok, pivot_tok, pair_counts, needed=used)
    if cfg.align.prefix:
        aligner.use_vocab_map(vocab_map)

    # Pass 2: projection.
    cases: Counter = Counter()
    by_how: Counter = Counter()
    unmapped_positions = 0
    pid_type = id_dtype(len(pivot_tok))
    with build_output(out, "align", fingerprint, started) as building, progress_bar() as bar:
        vocab_map.save(building.folder / "vocab_map.npz")
        shards = ShardWriter(building.folder, cfg.represent.shard_size,
                             lambda path, rows, meta: write_aligned_shard(path, rows, meta, pid_type))
        task = bar.add_task(f"align {spec.name}: projection", total=total)
        for p, s in paired(pivot_dir, source_dir, spec.name):
            proj = aligner.project(p, s, texts[p.seq], vocab_map, cfg.align.unaligned)
            cases.update(STATUS_NAMES[int(x)] for x in proj.status)
            by_how.update(proj.counts())
            unmapped_positions += proj.unmapped_positions
            shards.add(AlignedRow(seq=p.seq, id=p.id, ids=proj.ids, probs=proj.probs, status=proj.status,
                                  source_ce=s.ce, source_tokens=s.assistant_tokens, source_bytes=s.assistant_bytes,
                                  source_finite=s.finite))
            bar.advance(task)
        shards.flush()
        targets = cases["aligned"] + cases["one_hot"] + cases["dropped"]
        coverage = vocab_map.coverage()
        used_coverage = vocab_map.coverage(used[used < len(vocab_map.method)])
        building.manifest.update(
            source=spec.name, pivot=cfg.pivot.name, method=cfg.align.method,
            unaligned=cfg.align.unaligned, sequences=total, groups=dict(kinds),
            positions={k: cases[k] for k in ("aligned", "one_hot", "dropped", "no_target")},
            aligned_share=round(cases["aligned"] / targets, 4) if targets else None,
            coverage=coverage_by_how(by_how),
            aligned_positions_without_mapped_ids=unmapped_positions,
            vocab_coverage=coverage, vocab_coverage_of_used_ids=used_coverage,
            source_vocab_size=int(len(vocab_map.pivot_id)), shards=shards.written,
        )
    console.print(summary_table(f"align {spec.name} → {out}", [
        ("sequences", total),
        *[(f"groups {k.replace('_', '-')}", v) for k, v in kinds.items()],
        ("assistant positions with a source distribution", cases["aligned"]),
        ("  of them: exact span", by_how["exact"]),
        ("  of them: byte prefix", by_how["prefix"]),
        ("one-hot fallback", cases["one_hot"]),
        ("dropped", cases["dropped"]),
        *[(f"vocab map: {k}", v) for k, v in coverage.items()],
        *[(f"vocab map, ids in the top-k: {k}", v) for k, v in used_coverage.items()],
    ]))
    return out


def coverage_by_how(counts: Counter | dict) -> dict:
    """Scored pivot positions by how they got a distribution, with shares of all of them."""
    out = {k: int(counts.get(k, 0)) for k in ("exact", "prefix", "fallback")}
    total = sum(out.values())
    out["positions"] = total
    for k in ("exact", "prefix", "fallback"):
        out[f"{k}_share"] = round(out[k] / total, 4) if total else None
    out["covered_share"] = round((out["exact"] + out["prefix"]) / total, 4) if total else None
    return out
