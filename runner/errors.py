"""The one exception type for bad user input.

A `UserError` is printed as a single line (no traceback) and makes the runner exit non-zero.
Its message must name the file, key or value at fault and say what to do.
"""


class UserError(Exception):
    """Bad input from the user: a name, a config value, a missing file."""
