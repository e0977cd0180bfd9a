"""Errors that fusechat reports to the user as a message, never as a traceback."""


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

