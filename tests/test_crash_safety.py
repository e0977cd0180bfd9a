"""What a run can rely on after a crash or beside another run: one run per directory, leftovers removed,
files flushed before they are renamed into place, damaged shards found and redone."""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_config

from fusechat import align, prepare, represent
from fusechat.config import load_config
from fusechat.errors import FusechatError
from fusechat.pipeline import run_stage
from fusechat.rundir import LOCK_FILE, atomic_dir, remove_dead_temporaries, run_lock


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hold_lock(run_dir):
    """Another process holding the run directory's lock until it is killed."""
    code = ("import sys, time; from fusechat.rundir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------------ one run per directory


def test_a_second_run_of_one_directory_stops_with_the_holders_pid(tmp_path, capsys, tokenizer_dirs):
    from fusechat.cli import main

    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(FusechatError, match=rf"in use by another fusechat run \(pid {holder.pid} on "):
            with run_lock(run_dir):
                pass
        config = tmp_path / "run.yaml"
        model = tokenizer_dirs["byte_bpe"]
        config.write_text(f"run_dir: {run_dir}\npivot: {{name: p, path: {model}}}\n"
                          f"sources: [{{name: s, path: {model}}}]\ndata: {{paths: [{config}]}}\n")
        with pytest.raises(SystemExit) as done:
            main(["prepare", str(config)])
        assert done.value.code == 1
        assert f"pid {holder.pid}" in " ".join(capsys.readouterr().err.split())
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # the kernel released it with the process
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_message(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "here", "started_at": "then"}))
    with run_lock(run_dir):
        with run_lock(run_dir):  # re-entrant within one process
            pass
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {pid}" in " ".join(capsys.readouterr().err.split())
    assert (run_dir / LOCK_FILE).read_text() == ""  # released: nothing to take over next time
    with run_lock(run_dir):
        pass
    assert "taking over" not in capsys.readouterr().err


# ------------------------------------------------------------------ leftovers of killed runs


def test_temporaries_of_dead_processes_are_removed_when_a_stage_starts(tmp_path, zoo):
    cfg = load_config(write_config(tmp_path, zoo))
    run_dir = tmp_path / "run"
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = [run_dir / f".prepared.tmp-{dead}", run_dir / "targets" / f".mistral.tmp-{dead}",
                     run_dir / "merged" / f".varm.old-{dead}"]
        for folder in leftovers:
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
        shard_tmp = run_dir / "represent" / "mistral" / f".shard-00004.parquet.tmp-{dead}"
        shard_tmp.parent.mkdir(parents=True)
        shard_tmp.write_bytes(b"PAR1")
        busy = run_dir / "represent" / "mistral" / f".shard-00001.parquet.tmp-{alive.pid}"
        busy.write_bytes(b"PAR1")
        run_stage("prepare", cfg)
        assert not any(p.exists() for p in [*leftovers, shard_tmp])
        assert busy.exists()  # a live process's file is left alone
        assert (run_dir / "prepared" / "manifest.json").exists()
    finally:
        alive.kill()
        alive.wait()
    assert remove_dead_temporaries(run_dir) == [busy]


# ------------------------------------------------------------------ flushed before renamed


def test_atomic_output_is_flushed_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "weights").mkdir()
        (tmp / "weights" / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "config.json").write_text("{}")
    rename = events.index(("replace", str(tmp)))
    flushed = {path for kind, path in events[:rename] if kind == "fsync"}
    assert {str(tmp / "weights" / "model.safetensors"), str(tmp / "config.json"), str(tmp)} <= flushed
    assert (final / "weights" / "model.safetensors").read_bytes() == b"w" * 100


# ------------------------------------------------------------------ damaged shards


def test_a_torn_shard_is_found_and_redone_not_a_traceback(tmp_path, zoo, capsys):
    cfg = load_config(write_config(tmp_path, zoo))
    prepare.run(cfg)
    represent.run(cfg)
    folder = tmp_path / "run" / "represent" / "mistral"
    good = {p.name: p.read_bytes() for p in folder.glob("shard-*.parquet")}
    torn = folder / "shard-00001.parquet"
    torn.write_bytes(good[torn.name][: len(good[torn.name]) // 2])  # what a power loss can leave
    with pytest.raises(FusechatError, match=r"shard-00001.parquet is damaged \(not a whole Parquet file.*"
                                            r"rerun `fusechat represent CONFIG --model mistral`"):
        align.run(cfg)
    capsys.readouterr()
    represent.run(cfg)
    assert "shard-00001.parquet is damaged" in " ".join(capsys.readouterr().err.split())
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*.parquet")} == good

    aligned = align.run(cfg)[0]
    shard = aligned / "shard-00000.parquet"
    whole = shard.read_bytes()
    shard.write_bytes(b"")
    align.run(cfg)
    assert "is damaged (empty file); redoing it" in " ".join(capsys.readouterr().err.split())
    assert shard.read_bytes() == whole
