"""Fault injection: each resumable stage is killed with SIGKILL at seeded random moments, rerun to the end,
and its output compared with an uninterrupted run's.

A kill comes either after a random delay within the stage's measured duration, or the moment a file of
interest appears (a shard or checkpoint being written, a temporary output folder about to be renamed).
Several kills in a row hit one trial, each rerun starting from what the previous kill left; then a rerun
goes to the end. Survived: it ends with exit status 0, its output equals the uninterrupted run's (the
same bytes; train weights within rtol 1e-5 / atol 1e-6, fp32 on CPU), no temporary is left and the lock
is free.

Stage processes are forked from a server that has imported fusechat once, so that a kill costs the
stage's work, not seconds of imports; each runs the ``fusechat`` command's entry point (``cli.main``), as
``python -m fusechat STAGE CONFIG`` does. One trial also runs that command itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONVERSATIONS, write_jsonl
from safetensors.torch import load_file

from fusechat.rundir import LOCK_FILE, TEMPORARY_RE

STAGES = ("represent", "align", "fuse", "train", "merge")
PRELOAD = ["fusechat.cli", "fusechat.pipeline", "fusechat.represent", "fusechat.align", "fusechat.fuse",
           "fusechat.train", "fusechat.merge"]
# Files whose appearance is a moment worth a kill: a stage writing a shard, a checkpoint or a model.
WRITE_MOMENTS = {
    "represent": ["represent/*/.shard-*.tmp-*", "represent/*/shard-*.parquet"],
    "align": ["align/.*.tmp-*/shard-*", "align/.*.tmp-*/manifest.json"],
    "fuse": ["fuse/.*.tmp-*/shard-*", "fuse/.*.tmp-*/manifest.json"],
    "train": ["targets/.*.work/checkpoints/checkpoint-*", "targets/.*.work/checkpoints/checkpoint-*/optimizer.pt",
              "targets/.*.tmp-*/model.safetensors"],
    "merge": ["merged/.*.tmp-*/*.safetensors", "merged/.*.tmp-*/manifest.json"],
}
TRAIN = {"max_steps": 6, "global_batch_size": 2, "per_device_batch_size": 1, "learning_rate": 5e-3,
         "logging_steps": 2, "save_steps": 2, "warmup_ratio": 0.0, "report_to": ["none"], "baselines": ["sft"]}


def _run_cli(argv: list[str]) -> None:
    from fusechat.cli import main

    main(argv)


class Runner:
    """Starts ``fusechat STAGE CONFIG`` processes forked from a preloaded server."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def start(self, stage: str, config: Path):
        proc = self.ctx.Process(target=_run_cli, args=([stage, str(config)],))
        proc.start()
        return proc

    def run(self, stage: str, config: Path) -> float:
        started = time.time()
        proc = self.start(stage, config)
        proc.join(600)
        assert proc.exitcode == 0, f"fusechat {stage} ended with {proc.exitcode}"
        return time.time() - started


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, zoo):
    """The uninterrupted run, stage by stage: a snapshot of the run directory before each stage, the
    output after it, and how long it took."""
    root = tmp_path_factory.mktemp("faults")
    data = write_jsonl(root / "data.jsonl", CONVERSATIONS)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"),
        "pivot": {"name": "llama", "path": str(zoo["llama"])},
        "sources": [{"name": "mistral", "path": str(zoo["mistral"])}],
        "data": {"paths": [str(data)]},
        "represent": {"dtype": "fp32", "batch_size": 2, "shard_size": 2},
        "train": TRAIN,
        "merge": {"targets": ["mistral", "sft"], "baselines": ["linear"], "max_shard_size_mb": 0.02},
    }))
    runner = Runner()
    runner.run("prepare", config)
    snapshots, durations = {}, {}
    for stage in STAGES:
        snapshots[stage] = root / "before" / stage
        shutil.copytree(root / "run", snapshots[stage])
        durations[stage] = runner.run(stage, config)
    return {"root": root, "config": config, "runner": runner, "snapshots": snapshots, "durations": durations,
            "reference": root / "run"}


def outputs(run_dir: Path, stage: str) -> dict[str, Path]:
    folder = {"represent": "represent", "align": "align", "fuse": "fuse", "train": "targets", "merge": "merged"}[stage]
    return {str(p.relative_to(run_dir)): p for p in sorted((run_dir / folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name not in ("manifest.json", "README.md")
            and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def same_output(stage: str, got_dir: Path, ref_dir: Path) -> str | None:
    """None when the stage's output under ``got_dir`` equals the reference's, else what differs."""
    got, ref = outputs(got_dir, stage), outputs(ref_dir, stage)
    if sorted(got) != sorted(ref):
        return f"files differ: {sorted(set(got) ^ set(ref))}"
    for name, path in ref.items():
        if stage == "train" and name.endswith(".safetensors"):
            a, b = load_file(str(got[name])), load_file(str(path))
            for t in b:
                if not torch.allclose(a[t], b[t], rtol=1e-5, atol=1e-6):
                    return f"{name}: tensor {t} differs beyond rtol 1e-5 / atol 1e-6"
        elif stage == "train" and name.endswith(".json"):
            continue  # configs and tokenizer files; the weights are what training made
        elif got[name].read_bytes() != path.read_bytes():
            return f"{name}: other bytes"
    for folder in {Path(n).parts[0] + "/" + Path(n).parts[1] for n in ref}:
        manifest = json.loads((got_dir / folder / "manifest.json").read_text())
        if not manifest.get("complete"):
            return f"{folder}: manifest not complete"
    leftovers = [p for p in got_dir.rglob("*") if TEMPORARY_RE.match(p.name) or p.name.endswith(".work")]
    if leftovers:
        return f"leftovers: {leftovers[:3]}"
    if (got_dir / LOCK_FILE).read_text():
        return "the lock is still held"
    return None


def wait_for_moment(proc, run_dir: Path, patterns: list[str], nth: int, timeout: float) -> bool:
    """Wait until the ``nth`` new file matching ``patterns`` appears (True), or the process ends (False)."""
    seen: set[str] = set()
    deadline = time.time() + timeout
    while proc.is_alive() and time.time() < deadline:
        for pattern in patterns:
            try:
                found = list(run_dir.glob(pattern))
            except FileNotFoundError:  # a temporary folder renamed or removed while glob walked it
                continue
            for p in found:
                if str(p) not in seen:
                    seen.add(str(p))
                    if len(seen) >= nth:
                        return True
        time.sleep(0.002)
    return False


def sweep(pipeline, stage: str, kills: int, seed: int, kills_per_trial: int = 3) -> dict:
    """Kill ``stage`` ``kills`` times at seeded random moments, in trials of a few kills and one run to the
    end; returns the trials run and survived, and what happened."""
    rng = random.Random(f"{stage}-{seed}")
    runner, config = pipeline["runner"], pipeline["config"]
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    duration = pipeline["durations"][stage]
    stats = {"kills": 0, "finished_before_the_kill": 0, "trials": 0, "survived": 0, "failures": []}
    shutil.rmtree(run_dir)
    shutil.copytree(pipeline["snapshots"][stage], run_dir)
    in_trial = 0
    attempts = 0
    while stats["kills"] < kills and attempts < kills * 4:
        attempts += 1
        proc = runner.start(stage, config)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, duration))
        else:
            wait_for_moment(proc, run_dir, [rng.choice(WRITE_MOMENTS[stage])], rng.randint(1, 3), duration * 2)
        ended = not proc.is_alive()
        if ended:
            proc.join()
            stats["finished_before_the_kill"] += 1
            if proc.exitcode != 0:
                stats["failures"].append(f"a rerun after a kill ended with exit status {proc.exitcode}")
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            stats["kills"] += 1
            in_trial += 1
        if ended or in_trial >= kills_per_trial or stats["kills"] >= kills:
            # End the trial: rerun to the end, compare, start the next trial from the stage's inputs.
            stats["trials"] += 1
            try:
                runner.run(stage, config)
                problem = same_output(stage, run_dir, pipeline["reference"])
            except AssertionError as e:
                problem = str(e)
            if problem is None:
                stats["survived"] += 1
            else:
                stats["failures"].append(problem)
            shutil.rmtree(run_dir)
            shutil.copytree(pipeline["snapshots"][stage], run_dir)
            in_trial = 0
    return stats


def report(results: dict) -> str:
    lines = [f"{'stage':<10} {'kills':>5} {'trials':>6} {'survived':>8} {'ended first':>11}"]
    for stage, r in results.items():
        lines.append(f"{stage:<10} {r['kills']:>5} {r['trials']:>6} {r['survived']:>8} "
                     f"{r['finished_before_the_kill']:>11}")
    return "\n".join(lines)


def run_sweep(pipeline, kills_per_stage: int, seed: int, record_property) -> None:
    results = {stage: sweep(pipeline, stage, kills_per_stage, seed) for stage in STAGES}
    print("\n" + report(results))
    record_property("fault_injection", json.dumps(results))
    for stage, r in results.items():
        assert r["kills"] >= kills_per_stage, (stage, r)
        assert r["survived"] == r["trials"] and not r["failures"], (stage, r["failures"])


def test_fault_injection_fast_sweep(pipeline, record_property):
    run_sweep(pipeline, kills_per_stage=4, seed=0, record_property=record_property)


@pytest.mark.slow
def test_fault_injection_slow_sweep(pipeline, record_property):
    run_sweep(pipeline, kills_per_stage=20, seed=1, record_property=record_property)


def test_the_command_itself_killed_and_rerun(pipeline):
    """`python -m fusechat represent CONFIG`, killed once its first shard is written, then rerun."""
    config, run_dir = pipeline["config"], Path(yaml.safe_load(pipeline["config"].read_text())["run_dir"])
    shutil.rmtree(run_dir)
    shutil.copytree(pipeline["snapshots"]["represent"], run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "fusechat", "represent", str(config)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and not list(run_dir.glob("represent/*/shard-*.parquet")) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_output("represent", run_dir, pipeline["reference"]) is None
