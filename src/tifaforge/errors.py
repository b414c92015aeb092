"""The one exception type users see as a one-line error (the CLI prints it and exits non-zero)."""


class TifaError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message names the file (and line and field where known) and the problem; the CLI prints
    `tifa: error: <message>` and exits with status 2, without a traceback.
    """


class ConfigError(TifaError):
    """A config file with an unknown key, a value of the wrong type, or a value out of range."""


class MissingExtraError(TifaError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""
