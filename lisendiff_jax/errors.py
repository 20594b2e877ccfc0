"""The base of every error about the user's input, files or settings.

Command lines catch `UserError` and print its message as one line, with no traceback; any
other exception is a bug and keeps its traceback. Each subclass also derives from the builtin
error that fits it (ValueError, FileNotFoundError, ...), so callers may catch either.
"""


class UserError(Exception):
    """Bad input, a missing or broken file, or settings that cannot work; the message says
    which file, line or option."""
