"""What a merge keeps of each target's gain, and where it stands against plain fine-tuning.

For a merge m and a source s with skills S (the source's `skills` in the config),
the retention of target-s's gain is, in bits per byte (lower is better),

    retention(m, s) = Σ_{k∈S} (pivot_k − m_k) / Σ_{k∈S} (pivot_k − target_k)

1 when the merge is as good as the target on the source's skills, 0 when it is no
better than the pivot, above 1 when it is better than the target (with `train.start:
implicit-sft` a target's gain is what both of its steps brought). Summing over the
skills before dividing keeps one skill where the target barely moved from blowing the
ratio up. No value where the target gained nothing (the denominator is not positive).
"""

from __future__ import annotations

TARGET_PREFIX = "target-"


def retention(bits_per_byte: dict[str, dict[str, float | None]], source_skills: dict[str, list[str]],
              merges: list[str]) -> dict[str, dict[str, float | None]]:
    """``{merge: {source: fraction or None}}`` from the bits-per-byte table (rows: pivot, target-<source>, merges)."""
    pivot = bits_per_byte.get("pivot", {})
    out: dict[str, dict[str, float | None]] = {}
    for merge in merges:
        row = bits_per_byte.get(merge)
        if row is None:
            continue
        out[merge] = {}
        for source, skills in source_skills.items():
            target = bits_per_byte.get(TARGET_PREFIX + source)
            cells = [(pivot.get(k), target.get(k) if target else None, row.get(k)) for k in skills]
            if target is None or not cells or any(None in c for c in cells):
                out[merge][source] = None
                continue
            gained = sum(p - t for p, t, _ in cells)
            kept = sum(p - m for p, _, m in cells)
            out[merge][source] = round(kept / gained, 4) if gained > 0 else None
    return out


def against(bits_per_byte: dict[str, dict[str, float | None]], rows: list[str],
            reference: str = "sft") -> dict[str, dict[str, float | None]]:
    """``{row: {skill: row − reference}}`` in bits per byte (negative: the row is better), average included."""
    ref = bits_per_byte.get(reference)
    if ref is None:
        return {}
    out = {}
    for name in rows:
        row = bits_per_byte.get(name)
        if row is not None and name != reference:
            out[name] = {k: (round(v - ref[k], 4) if v is not None and ref.get(k) is not None else None)
                         for k, v in row.items()}
    return out
