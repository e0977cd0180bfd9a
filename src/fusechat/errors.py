"""Errors that fusechat reports to the user as a message, never as a traceback."""


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

