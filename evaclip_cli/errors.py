"""One error type for everything the user can fix: printed as one line, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what, where and what to do. Never shown with a traceback."""

    exit_code = 2
