"""The one exception type for mistakes a user can make (paths, names, corrupt files, hardware).

The CLI prints its message as a single line on stderr and exits with code 2; anything else that
escapes is a bug and keeps its traceback.
"""


class CissError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""
