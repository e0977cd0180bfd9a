"""What the run's stages recorded, for the report beside the scores.

Read from the manifests: alignment coverage per source (share of the pivot's
assistant positions that received a source distribution, split by how: exact
span, byte prefix, fallback; vocabulary-map
coverage by method), bytes per token of each representation, MinCE choices and
what each chosen teacher holds beyond the gold tokens, and the wall time of every stage.
"""

from __future__ import annotations

from fusechat.config import RunConfig
from fusechat.rundir import RunDir, read_manifest
from fusechat.stages import STAGES


def pipeline_summary(cfg: RunConfig) -> dict:
    rundir = RunDir(cfg.run_dir)
    summary: dict = {"alignment": {}, "representation": {}, "fusion": {}, "teachers": {}, "stage_seconds": {}}
    for spec in cfg.sources:
        m = read_manifest(rundir.stage("align", spec.name)) or {}
        if m:
            summary["alignment"][spec.name] = {
                "aligned_share": m.get("aligned_share"),
                "coverage": m.get("coverage"),
                "positions": m.get("positions"),
                "vocab_coverage": m.get("vocab_coverage"),
                "vocab_coverage_of_used_ids": m.get("vocab_coverage_of_used_ids"),
                "source_vocab_size": m.get("source_vocab_size"),
            }
        f = read_manifest(rundir.stage("fuse", spec.name)) or {}
        if f:
            summary["fusion"][spec.name] = f.get("choices")
            if f.get("teachers"):
                summary["teachers"][spec.name] = f["teachers"]
    for spec in cfg.models:
        m = read_manifest(rundir.stage("represent", spec.name)) or {}
        if m:
            summary["representation"][spec.name] = {
                "bytes_per_token": m.get("bytes_per_token"), "tokens": m.get("tokens"),
                "tokens_per_s": m.get("tokens_per_s"),
            }
    pairs = read_manifest(rundir.root / "pairs") or {}
    if pairs.get("complete"):
        report = pairs.get("report") or {}
        summary["implicit"] = {k: report.get(k) for k in ("prompts", "answers", "sft", "pairs", "kind",
                                                           "mean_margin", "per_model")}
    for stage in STAGES:
        if stage.name == "eval":
            continue  # still running while this is written
        folder = rundir.stage(stage.name)
        manifests = ([read_manifest(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
                     if stage.per_model and folder.is_dir() else [read_manifest(folder)])
        seconds = [m.get("elapsed_s") for m in manifests if m and m.get("elapsed_s") is not None]
        if seconds:
            summary["stage_seconds"][stage.name] = round(sum(seconds), 1)
    return summary


def format_pipeline(summary: dict) -> str:
    lines = ["## Pipeline", ""]
    if summary.get("alignment"):
        lines += ["| source | assistant positions with a source distribution | of them by exact span / byte prefix | "
                  "vocab map (all ids): exact / statistics / edit distance / special / unmapped | "
                  "vocab map (ids in the top-k) |",
                  "|---|---:|---|---|---|"]
        for name, a in summary["alignment"].items():
            share = a.get("aligned_share")
            lines.append(f"| {name} | {'–' if share is None else f'{share:.1%}'} | {_how(a.get('coverage'))} | "
                         f"{_coverage(a.get('vocab_coverage'))} | {_coverage(a.get('vocab_coverage_of_used_ids'))} |")
        lines.append("")
    if summary.get("representation"):
        lines += ["| model | tokens | bytes per token on disk | tokens/s |", "|---|---:|---:|---:|"]
        for name, r in summary["representation"].items():
            lines.append(f"| {name} | {r.get('tokens')} | {r.get('bytes_per_token')} | {r.get('tokens_per_s')} |")
        lines.append("")
    if summary.get("fusion"):
        lines += ["MinCE choices per sequence: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in (choices or {}).items())
            for name, choices in summary["fusion"].items()), ""]
    if summary.get("teachers"):
        lines += ["| fused set | teacher | positions taught | p(gold token) | top token is gold | entropy (nats) |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, teachers in summary["teachers"].items():
            lines += [f"| {name} | {t} | {v['positions']} | {v['gold_prob']:.3f} | {v['top_is_gold']:.1%} | "
                      f"{v['entropy']:.3f} |" for t, v in teachers.items()]
        lines.append("")
    if summary.get("implicit"):
        i = summary["implicit"]
        lines += [f"Implicit fusion: {i['answers']} sampled answers to {i['prompts']} prompts; SFT set {i['sft']} "
                  f"answers; {i['pairs']} {i['kind']} pairs (mean score margin {i['mean_margin']})", ""]
    if summary.get("stage_seconds"):
        lines += ["| stage | wall time (s) |", "|---|---:|"]
        lines += [f"| {stage} | {s} |" for stage, s in summary["stage_seconds"].items()]
        lines.append("")
    return "\n".join(lines)


def _how(c: dict | None) -> str:
    if not c or not c.get("positions"):
        return "–"
    return f"{c['exact_share']:.1%} / {c['prefix_share']:.1%}"


def _coverage(c: dict | None) -> str:
    if not c:
        return "–"
    total = sum(c.values()) or 1
    return " / ".join(f"{c.get(k, 0) / total:.1%}" for k in ("exact", "statistics", "edit_distance", "special",
                                                               "unmapped"))
