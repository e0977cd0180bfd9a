"""Errors that fusechat reports to the user as a message, never as a traceback."""

import errno
import re

MAX_LISTED = 20  # problems an error message lists before "... and N more"


def listed(lines: list[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` lines, indented, and how many more there are."""
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(f"  {line}" for line in lines[:limit]) + more


class FusechatError(Exception):
    """A problem with the user's input or environment; the message says what to fix."""


class ConfigError(FusechatError):
    """The run config is invalid. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str], headline: str = "invalid config"):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {headline} ({len(problems)} problem(s)):\n{lines}")


class DataError(FusechatError):
    """A record of the input data is malformed; the message names file, record and field."""



# What a write that the disk or the file system refuses means, and what the user can do.
_DISK_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (an immutable folder, or a permission)",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large (a file-size limit, `ulimit -f`, or the file system's largest file)",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")  # Arrow's IO errors carry the errno in their text only


def disk_errno(e: BaseException) -> int | None:
    """The errno of a write the disk or file system refused (permission, read-only, file size, space), or None."""
    if not isinstance(e, OSError):
        return None
    code = e.errno
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(e))
        code = int(found.group(1)) if found else None
    return code if code in _DISK_ERRNOS else None


class DiskError(FusechatError):
    """A folder fusechat must write in cannot be written: the message names it and says what to do."""

    def __init__(self, folder, e: OSError):
        code = disk_errno(e)
        self.folder, self.errno = folder, code
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            advice = ("free space (or raise the limit), or give the run another folder (`run_dir`, or "
                      "`--set run_dir=DIR`); complete work is kept, rerun the same command to go on")
        else:
            advice = ("make it writable, or give the run a writable folder (`run_dir`, or `--set run_dir=DIR`); "
                      "complete work is kept, rerun the same command to go on")
        super().__init__(f"cannot write in {folder}: {_DISK_ERRNOS.get(code, e)}. Nothing half-written was left: "
                         f"{advice}")
