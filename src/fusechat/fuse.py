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

Output ``<run_dir>/fuse/<source|multi>/shard-*.parquet``: ``DistRow`` whose
``status`` is 1 where the position is part of the fusion loss, with ``choice``
(0 pivot, j the j-th source of the set, −1 excluded) and each candidate's CE.
"""

from __future__ import annotations

import time
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
from fusechat.config import RunConfig
from fusechat.errors import FusechatError
from fusechat.progress import console, progress_bar, summary_table
from fusechat.rundir import (
    RunDir,
    atomic_dir,
    inputs_fingerprint,
    is_complete,
    new_manifest,
    read_manifest,
    write_manifest,
)
from fusechat.shards import (
    DistRow,
    id_dtype,
    read_dists,
    read_representation,
    shard_name,
    write_dist_shard,
)

MULTI = "multi"


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


def fuse_sequence(method: str, pivot_rep, sources: list[DistRow], unit: str, k: int):
    """Fused (ids, probs, in_loss, choice, ces) of one sequence from the pivot and the given sources."""
    p_ids, p_probs, p_status = pivot_distribution(pivot_rep.topk_ids, pivot_rep.topk_logits, pivot_rep.assistant_mask)
    candidates = [(p_ids, p_probs, in_loss(p_status))] + [(s.ids.astype(np.int64), s.probs.astype(np.float32),
                                                           in_loss(s.status)) for s in sources]
    ces = [comparable_ce(pivot_rep.ce, pivot_rep.assistant_tokens, pivot_rep.assistant_bytes, unit)] + [
        comparable_ce(s.extra["source_ce"], s.extra["source_tokens"], s.extra["source_bytes"], unit) for s in sources]
    finite = [pivot_rep.finite] + [bool(s.extra["source_finite"]) for s in sources]
    if method == "avg_ce":
        weights = avg_ce_weights(ces, finite)
        if not weights.any():
            return p_ids, p_probs, np.zeros(len(p_ids), bool), -1, ces
        ids, probs, present = mix(candidates, weights, k)
        return ids, probs, present & candidates[0][2], int(np.argmax(weights)), ces
    choice = min_ce_choice(ces, finite)
    if choice < 0:
        return p_ids, p_probs, np.zeros(len(p_ids), bool), -1, ces
    ids, probs, mask = candidates[choice]
    return ids, probs, mask, choice, ces


def run(cfg: RunConfig, force: bool = False) -> list[Path]:
    if cfg.fuse.method == MULTI:
        return [fuse_set(cfg, MULTI, [s.name for s in cfg.sources], force)]
    return [fuse_set(cfg, s.name, [s.name], force) for s in cfg.sources]


def _complete_alignment(cfg: RunConfig, source: str) -> tuple[Path, dict]:
    folder = RunDir(cfg.run_dir).stage("align", source)
    manifest = read_manifest(folder)
    if not manifest or not manifest.get("complete"):
        raise FusechatError(f"{folder} has no complete alignment; run `fusechat align CONFIG` first")
    return folder, manifest


def fuse_set(cfg: RunConfig, name: str, sources: list[str], force: bool = False) -> Path:
    rundir = RunDir(cfg.run_dir)
    out = rundir.stage("fuse", name)
    pivot_dir, pm = complete_representation(cfg, cfg.pivot)
    aligned = [_complete_alignment(cfg, s) for s in sources]
    payload = {"pivot": pm["fingerprint"], "align": [m["fingerprint"] for _, m in aligned],
               "fuse": cfg.section_hash("fuse")}
    fingerprint = inputs_fingerprint(payload)
    if is_complete(out, fingerprint, force, label=f"fuse {name}"):
        return out

    started = time.time()
    k = cfg.represent.top_k
    choices: Counter = Counter()
    positions = 0
    labels = ["pivot", *sources]
    readers = [read_dists(folder) for folder, _ in aligned]
    pid_type = id_dtype(pm.get("vocab_size", 1 << 20))
    with atomic_dir(out) as tmp, progress_bar() as bar:
        task = bar.add_task(f"fuse {name}", total=pm["num_sequences"])
        rows, shard = [], 0
        for p in read_representation(pivot_dir):
            srcs = [next(r, None) for r in readers]
            if any(s is None or s.seq != p.seq for s in srcs):
                raise FusechatError(f"alignments of {', '.join(sources)} do not match the pivot at sequence {p.id!r}")
            ids, probs, mask, choice, ces = fuse_sequence(cfg.fuse.method, p, srcs, cfg.fuse.ce_unit, k)
            choices["excluded" if choice < 0 else labels[choice]] += 1
            positions += int(mask.sum())
            rows.append(DistRow(seq=p.seq, id=p.id, ids=ids, probs=probs, status=mask.astype(np.int8),
                                extra={"choice": choice, **{f"ce_{lbl}": float(c) for lbl, c in zip(labels, ces)}}))
            if len(rows) == cfg.represent.shard_size:
                write_dist_shard(tmp / shard_name(shard), rows, {"shard": shard}, pid_type)
                rows, shard = [], shard + 1
            bar.advance(task)
        if rows:
            write_dist_shard(tmp / shard_name(shard), rows, {"shard": shard}, pid_type)
        manifest = new_manifest(
            "fuse", fingerprint, name=name, pivot=cfg.pivot.name, sources=sources, method=cfg.fuse.method,
            ce_unit=cfg.fuse.ce_unit, pivot_tokenizer_hash=pm["tokenizer_hash"], top_k=k,
            sequences=pm["num_sequences"], choices={lbl: choices[lbl] for lbl in [*labels, "excluded"]},
            positions_in_fusion_loss=positions, elapsed_s=round(time.time() - started, 3),
        )
        manifest["complete"] = True
        write_manifest(tmp, manifest)
    console.print(summary_table(f"fuse {name} ({cfg.fuse.method}) → {out}", [
        *[(f"sequences choosing {lbl}", choices[lbl]) for lbl in labels],
        ("sequences excluded (no finite CE)", choices["excluded"]),
        ("positions in the fusion loss", positions),
    ]))
    return out
