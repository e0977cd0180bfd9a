"""Model-written code, run only when the user allows it, each program alone in a sandbox.

Running code a model wrote is opt-in, as in the evaluation harnesses users know
(lm-eval's ``HF_ALLOW_CODE_EVAL=1``, bigcode's ``--allow_code_execution``): without
``FUSECHAT_ALLOW_CODE_EXECUTION=1`` (or the caller's own setting, ``config_allows``) a
stage that would run code stops and says how to allow it.

Each program then runs in a process of its own: ``python -I`` (no user site, no
``PYTHON*`` variables, not the current folder on the path) in a fresh temporary folder
that is also its ``HOME`` and ``TMPDIR``, with an environment of four variables (nothing
inherited: no keys, no tokens), no standard input, in a session of its own, under limits
on CPU time, memory, file size, open files and processes, and a wall-clock timeout after
which its whole process group is killed. Run as root, a program also runs as a user of
its own (a fresh uid no one else has), so it can write nowhere but its folder, its
process limit counts its own processes alone, and every process it left is killed after
it. A crash, a hang, a fork bomb or ``rm -rf ~`` scores 0 and harms nothing
else. What a non-root user runs keeps that user's rights over files outside ``HOME``:
for hostile code, run as root in a container or a virtual machine.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fusechat.errors import FusechatError

ALLOW_ENV = "FUSECHAT_ALLOW_CODE_EXECUTION"
SANDBOX_UIDS = (100_000_000, 200_000_000)  # as root, each program runs as a uid drawn here: one no one else has


def execution_allowed(config_allows: bool = False) -> bool:
    return config_allows or os.environ.get(ALLOW_ENV, "") == "1"


def require_allowed(what: str, config_allows: bool = False) -> None:
    """Stop, saying why and how to allow it, unless the user allowed running model-written code."""
    if not execution_allowed(config_allows):
        raise FusechatError(
            f"{what} runs code that models wrote, which fusechat does only when you allow it: set "
            f"{ALLOW_ENV}=1. Each program then runs alone: "
            "`python -I`, an empty environment, its own temporary folder as HOME, limits on CPU time, memory, "
            "file size and processes, a timeout (docs/code-execution.md)"
        )


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10
    wall_s: float = 15.0
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 65536


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed, failed (exit status not 0), timeout, killed (a signal)
    returncode: int | None
    output: str  # the end of what it wrote, stdout then stderr
    seconds: float


def run_program(source: str, limits: Limits = Limits(), marker: str | None = None) -> Outcome:
    """Run ``source`` as a Python program in the sandbox; passed when it exits 0 within the limits (and, with
    ``marker``, prints it: a program that leaves early with status 0 has not passed what follows)."""
    folder = Path(tempfile.mkdtemp(prefix="fusechat-run-"))
    uid = SANDBOX_UIDS[0] + secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) if os.geteuid() == 0 else None
    try:
        program = folder / "program.py"
        program.write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(folder, uid, uid)
            os.chown(program, uid, uid)
        env = {"HOME": str(folder), "TMPDIR": str(folder), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        started = time.monotonic()
        proc = subprocess.Popen(
            [interpreter(uid is not None), "-I", str(program)], cwd=folder, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
            preexec_fn=lambda: _confine(limits, uid),
        )
        try:
            out, err = proc.communicate(timeout=limits.wall_s)
            status = None
        except subprocess.TimeoutExpired:
            _kill_everything(proc.pid, uid)
            try:
                out, err = proc.communicate(timeout=2.0)
            except subprocess.TimeoutExpired:  # a process it started, beyond reach, still holds its output open
                proc.kill()
                out, err = b"", b"(its output was held open after the timeout)"
            status = "timeout"
        seconds = time.monotonic() - started
        _kill_everything(proc.pid, uid)  # what it started and left behind
        code = proc.returncode
        if status is None:
            reached = marker is None or marker.encode() in out[-limits.output_bytes:]
            status = "passed" if code == 0 and reached else ("killed" if code < 0 else "failed")
        output = (out[-limits.output_bytes:] + err[-limits.output_bytes:]).decode("utf-8", "replace")
        return Outcome(status == "passed", status, code, output, round(seconds, 3))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def code_of(answer: str) -> str:
    """The code of a chat answer: its first fenced code block (an unclosed one runs to the end), else all of it."""
    found = CODE_BLOCK.search(answer)
    return found.group(1) if found else answer


def run_to_end(source: str, limits: Limits = Limits()) -> Outcome:
    """``source`` in the sandbox, passed only when it runs to its last line: a program that leaves early, even
    with status 0 (``exit()`` in an answer, before the tests), has not passed."""
    marker = f"fusechat-ran-to-end-{secrets.token_hex(8)}"
    return run_program(f"{source}\nprint({marker!r})\n", limits, marker)


def passes_tests(code: str, tests: str, limits: Limits = Limits()) -> Outcome:
    """``code`` then ``tests`` (asserts, or any program) in the sandbox, run to the end."""
    return run_to_end(f"{code}\n\n{tests}\n", limits)


@functools.cache
def interpreter(own_user: bool) -> str:
    """The Python that runs the programs: this one, or, for a program of a user of its own (who may not read
    this one's folders, a home folder say), the first of this one and the system's that such a user can run."""
    if not own_user:
        return sys.executable
    uid = SANDBOX_UIDS[0]
    for candidate in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), shutil.which("python3"),
                                    "/usr/bin/python3", "/usr/local/bin/python3"]):
        if not candidate or not os.path.isfile(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-I", "-c", "import json, math, re, collections"], env={},
                                   stdin=subprocess.DEVNULL, capture_output=True, cwd="/",
                                   preexec_fn=lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid)))
        except OSError:  # it may not even start: a folder on its path that such a user cannot enter
            continue
        if probe.returncode == 0:
            return candidate
    raise FusechatError("no Python that an unprivileged user can run was found to run model-written code "
                        f"(tried {sys.executable} and python3 on the PATH): install python3 in /usr/bin")


def _confine(limits: Limits, uid: int | None) -> None:
    """In the child, before it runs: a session of its own, the limits, and (as root) a user of its own."""
    os.setsid()
    mb = 1 << 20
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mb),
                         (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NOFILE, limits.open_files),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # Counted per user: as its own user, the program's own processes; run by another user, all of that user's.
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def _kill_everything(pid: int, uid: int | None) -> None:
    """The program's process group, and with a user of its own every process of that user (those that left
    the group too)."""
    _kill_group(pid)
    if uid is not None:
        _kill_all_of(uid)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all_of(uid: int) -> None:
    """Kill every process of ``uid`` (a sandbox's own user), those that left the program's group included:
    ``kill(-1)`` from a process of that user reaches exactly that user's processes."""
    def become_and_kill():
        os.setgid(uid)
        os.setuid(uid)
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass

    reaper = subprocess.Popen([interpreter(True), "-I", "-c", "pass"], preexec_fn=become_and_kill,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.wait()
