"""Errors a user can act on.

Anything raised as :class:`UserError` is printed by the CLI as one message (no traceback) and
exits with code 2. Internal errors keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: config, data, paths. The message says what, where and what to do."""

    exit_code = 2


class DataError(UserError):
    """One or more bad data rows; ``problems`` holds ``(where, reason)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []
