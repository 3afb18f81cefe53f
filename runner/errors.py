"""The one exception type for bad user input.

A `UserError` is printed as a single line (no traceback) and makes the runner exit non-zero.
Its message must name the file, key or value at fault and say what to do.
"""


class UserError(Exception):
    """Bad input from the user: a name, a config value, a missing file."""


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (its type's name if it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
