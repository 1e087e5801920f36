"""Errors a user can act on.

A ``UserError`` is printed by the CLI as one line (``error: ...``) with exit
code 2; anything else is a bug and is reported as one line with exit code 1
(set HEXSWARM_DEBUG=1 for the traceback).
"""


class UserError(Exception):
    """Bad input, bad config, or an environment problem the user can fix."""


class ProtocolError(Exception):
    """A peer sent something that breaks a hexswarm wire protocol."""


def first_leaf(error: BaseException) -> BaseException:
    """The first real exception inside nested exception groups (trio nurseries wrap errors)."""
    while getattr(error, "exceptions", None):  # duck-typed: BaseExceptionGroup is 3.11+
        error = error.exceptions[0]
    return error
