"""One exception type for mistakes a user can fix, so the CLI can print them without a traceback."""


class ConfigError(ValueError):
    """Bad input or configuration; the message names the problem and the fix."""


class DataError(ConfigError):
    """A data file is missing, empty, misaligned or not UTF-8; the message names the file and line."""


class NonFiniteLossError(ConfigError):
    """Training diverged: a loss became NaN or infinite; the message names the step, the value and the fix."""
