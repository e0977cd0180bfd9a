"""Stage 4, fuse: per sequence, the target distribution the pivot's student learns from.

- ``min_ce`` (the paper's pairwise FuseChat): for each source, per sequence, the
  pivot's own distribution or the source's projected one, whichever model has the
  lower cross-entropy on the assistant tokens.
- ``multi`` (the paper's "Multi" baseline): the same choice over the pivot and
  every source at once; one fused set, ``fuse/multi``.
- ``avg_ce``: a mixture weighted by softmax(−CE) over the candidates, cut back to
  the top k.

Cross-entropy is compared per token (paper) or per byte (``fuse.ce_unit: byte``:
tokenizers of different granularity make per-token CE incomparable). A candidate
whose logits or CE were not finite is never chosen; a sequence with no finite
candidate is excluded from the fusion loss and counted.

Output ``<run_dir>/fuse/<source|multi>/shard-*.parquet``: ``FusedRow`` (the
distributions, ``in_loss`` per position, the ``choice``: 0 pivot, j the j-th source
of the set, −1 excluded, −2 gated, and each candidate's CE).

``fuse.max_ce`` gates the fusion term: a sequence whose best candidate's CE is above
it trains on its gold answer alone (no model knows it well enough to teach it).

The manifest's ``teachers`` says, per chosen candidate, what its distributions hold
beyond the gold answer, over the positions it teaches: the mean probability on the gold
next token, the share of positions whose top token is the gold one, and the mean
entropy (nats); with ``avg_ce`` the mixture counts under its lowest-CE candidate. A
teacher whose distributions are nearly the gold token adds little to the gold term;
one whose top token is often wrong pulls the target away from it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from fusechat.align.project import (
    ALIGNED,
    ONE_HOT,
    merge_duplicate_ids,
    pivot_distribution,
)
from fusechat.align.stage import complete_representation
from fusechat.config import MULTI, RunConfig, stable_hash
from fusechat.errors import FusechatError
from fusechat.progress import console, progress_bar, summary_table
from fusechat.rundir import RunDir, build_output, is_complete, require_complete
from fusechat.shards import (
    AlignedRow,
    FusedRow,
    SequenceRep,
    ShardWriter,
    id_dtype,
    read_aligned,
    read_representation,
    write_fused_shard,
)

EXCLUDED, GATED = -1, -2  # choices of a sequence out of the fusion term: no finite CE; best CE above fuse.max_ce
OUT_LABELS = {EXCLUDED: "excluded", GATED: "gated"}
FUSED_FORMAT = 2  # the shard layout (FusedRow); a new layout redoes older output


def comparable_ce(ce: float, tokens: int, n_bytes: int, unit: str) -> float:
    """Mean CE per token, or nats per byte of assistant text."""
    if unit == "byte":
        return ce * tokens / n_bytes if n_bytes else float("inf")
    return ce


def min_ce_choice(ces: list[float], finite: list[bool]) -> int:
    """Index of the lowest finite CE (the first among equals), or −1 when none is finite."""
    best, best_ce = -1, float("inf")
    for i, (ce, ok) in enumerate(zip(ces, finite)):
        if ok and np.isfinite(ce) and (best < 0 or ce < best_ce):
            best, best_ce = i, ce
    return best


def avg_ce_weights(ces: list[float], finite: list[bool]) -> np.ndarray:
    """softmax(−CE) over the finite candidates; zeros elsewhere (all zeros if none is finite)."""
    ces_arr = np.array(ces, dtype=np.float64)
    ok = np.array(finite, dtype=bool) & np.isfinite(ces_arr)
    w = np.zeros(len(ces))
    if ok.any():
        x = -ces_arr[ok]
        e = np.exp(x - x.max())
        w[ok] = e / e.sum()
    return w


def mix(candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]], weights: np.ndarray, k: int):
    """Weighted mixture of sparse distributions, per position, cut back to the top k and renormalised.

    candidates: (ids (T, k), probs (T, k), in_loss (T,)) each. A candidate absent at
    a position (``in_loss`` false) leaves the weights of the others renormalised there.
    """
    w = np.stack([weights[i] * c[2] for i, c in enumerate(candidates)], axis=1)  # (T, C)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    ids = np.concatenate([c[0] for c in candidates], axis=1)
    probs = np.concatenate([c[1] * w[:, i : i + 1] for i, c in enumerate(candidates)], axis=1)
    ids, probs = merge_duplicate_ids(ids.astype(np.int64), probs.astype(np.float32))
    ids, probs = ids[:, :k], probs[:, :k]
    mass = probs.sum(axis=1, keepdims=True)
    probs = np.divide(probs, mass, out=np.zeros_like(probs), where=mass > 0)
    return ids, probs, (total[:, 0] > 0)


def in_loss(status: np.ndarray) -> np.ndarray:
    return (status == ALIGNED) | (status == ONE_HOT)


def fuse_sequence(method: str, pivot_rep: SequenceRep, sources: list[AlignedRow], unit: str, k: int,
                  max_ce: float | None = None) -> FusedRow:
    """The fused row of one sequence from the pivot's own representation and the sources' aligned rows.

    With ``max_ce``, a sequence whose best candidate's CE is above it is left out of the fusion term
    (choice ``GATED``): no candidate knows its answer well, so a teacher would only pull it towards a poor guess."""
    p_ids, p_probs, p_status = pivot_distribution(pivot_rep.topk_ids, pivot_rep.topk_logits, pivot_rep.assistant_mask)
    candidates = [(p_ids, p_probs, in_loss(p_status))] + [(s.ids.astype(np.int64), s.probs.astype(np.float32),
                                                           in_loss(s.status)) for s in sources]
    ces = [comparable_ce(pivot_rep.ce, pivot_rep.assistant_tokens, pivot_rep.assistant_bytes, unit)] + [
        comparable_ce(s.source_ce, s.source_tokens, s.source_bytes, unit) for s in sources]
    finite = [pivot_rep.finite] + [bool(s.source_finite) for s in sources]
    row = lambda ids, probs, mask, choice: FusedRow(pivot_rep.seq, pivot_rep.id, ids, probs, mask, choice,  # noqa: E731
                                                    [float(c) for c in ces])
    best = min_ce_choice(ces, finite)
    if best < 0 or (max_ce is not None and ces[best] > max_ce):
        return row(p_ids, p_probs, np.zeros(len(p_ids), bool), EXCLUDED if best < 0 else GATED)
    if method == "avg_ce":
        ids, probs, present = mix(candidates, avg_ce_weights(ces, finite), k)
        return row(ids, probs, present & candidates[0][2], best)
    ids, probs, mask = candidates[best]
    return row(ids, probs, mask, best)


def teacher_sums(fused: FusedRow, input_ids: np.ndarray) -> np.ndarray:
    """Over one sequence's fused positions (position t teaches token t + 1): the count, and the sums of
    the probability on the gold token, of whether the top token is the gold one, and of the entropy."""
    t = np.flatnonzero(fused.in_loss[:-1])
    if not t.size:
        return np.zeros(4)
    gold = np.asarray(input_ids)[t + 1]
    probs, ids = fused.probs[t].astype(np.float64), fused.ids[t]
    p_gold = (probs * (ids == gold[:, None])).sum(axis=1)
    top_is_gold = ids[np.arange(t.size), probs.argmax(axis=1)] == gold
    log_p = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    entropy = -(probs * log_p).sum(axis=1)
    return np.array([t.size, p_gold.sum(), top_is_gold.sum(), entropy.sum()])


def teacher_summary(sums: np.ndarray) -> dict:
    n = int(sums[0])
    return {"positions": n, "gold_prob": round(sums[1] / n, 4), "top_is_gold": round(sums[2] / n, 4),
            "entropy": round(sums[3] / n, 4)}


def run(cfg: RunConfig, force: bool = False) -> list[Path]:
    """The fused sets the train stage needs: one per source (pairwise) or ``multi``, and ``multi`` for the
    Multi baseline (``train.baselines``)."""
    sources = [s.name for s in cfg.sources]
    if cfg.fuse.method == MULTI:
        return [fuse_set(cfg, MULTI, sources, force)]
    outs = [fuse_set(cfg, s, [s], force) for s in sources]
    if MULTI in cfg.train.baselines:
        outs.append(fuse_set(multi_config(cfg), MULTI, sources, force))
    return outs


def multi_config(cfg: RunConfig) -> RunConfig:
    """The run's config with every source fused at once: the paper's Multi baseline."""
    return cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"method": MULTI})})


def fuse_set(cfg: RunConfig, name: str, sources: list[str], force: bool = False) -> Path:
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("fuse", name)
    pivot_dir, pm = complete_representation(cfg, cfg.pivot)
    aligned = [rundir.stage("align", s) for s in sources]
    align_fps = [require_complete(folder, "alignment", "fusechat align CONFIG")["fingerprint"] for folder in aligned]
    payload = {"pivot": pm["fingerprint"], "align": align_fps, "fuse": cfg.section_hash("fuse"),
               "format": FUSED_FORMAT}
    fingerprint = stable_hash(payload)
    if is_complete(out, fingerprint, force, label=f"fuse {name}"):
        return out

    k = cfg.represent.top_k
    choices: Counter = Counter()
    positions = 0
    labels = ["pivot", *sources]
    teachers = {lbl: np.zeros(4) for lbl in labels}
    readers = [read_aligned(folder) for folder in aligned]
    pid_type = id_dtype(pm.get("vocab_size", 1 << 20))
    with build_output(out, "fuse", fingerprint) as building, progress_bar() as bar:
        shards = ShardWriter(building.folder, cfg.represent.shard_size,
                             lambda path, rows, meta: write_fused_shard(path, rows, meta, pid_type))
        task = bar.add_task(f"fuse {name}", total=pm["num_sequences"])
        for p in read_representation(pivot_dir):
            srcs = [next(r, None) for r in readers]
            if any(s is None or s.seq != p.seq for s in srcs):
                raise FusechatError(f"alignments of {', '.join(sources)} do not match the pivot at sequence {p.id!r}")
            fused = fuse_sequence(cfg.fuse.method, p, srcs, cfg.fuse.ce_unit, k, cfg.fuse.max_ce)
            choices[OUT_LABELS.get(fused.choice) or labels[fused.choice]] += 1
            positions += int(fused.in_loss.sum())
            if fused.choice >= 0:
                teachers[labels[fused.choice]] += teacher_sums(fused, p.input_ids)
            shards.add(fused)
            bar.advance(task)
        shards.flush()
        summaries = {lbl: teacher_summary(t) for lbl, t in teachers.items() if t[0]}
        building.manifest.update(
            name=name, pivot=cfg.pivot.name, sources=sources, candidates=labels, method=cfg.fuse.method,
            ce_unit=cfg.fuse.ce_unit, pivot_tokenizer_hash=pm["tokenizer_hash"], top_k=k,
            sequences=pm["num_sequences"], choices={lbl: choices[lbl] for lbl in [*labels, "excluded", "gated"]},
            max_ce=cfg.fuse.max_ce,
            positions_in_fusion_loss=positions, shards=shards.written,
            teachers=summaries,
        )
    console.print(summary_table(f"fuse {name} ({cfg.fuse.method}) → {out}", [
        *[(f"sequences choosing {lbl}", choices[lbl]) for lbl in labels],
        ("sequences excluded (no finite CE)", choices["excluded"]),
        *([(f"sequences gated (best CE above {cfg.fuse.max_ce})", choices["gated"])] if cfg.fuse.max_ce else []),
        ("positions in the fusion loss", positions),
        *[(f"teacher {lbl}: p(gold) / top gold / entropy",
           f"{t['gold_prob']:.2f} / {t['top_is_gold']:.0%} / {t['entropy']:.2f} nats") for lbl, t in summaries.items()],
    ]))
    return out
