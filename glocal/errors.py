"""The common base of the errors a user can fix by changing what they asked for."""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for (a config value, a path, a data file, a
    generation argument): the ``glocal`` command prints its message and exits 2, without
    a traceback (``glocal --debug`` shows one). The message says what is wrong and how to
    fix it. Subclasses keep their other bases (``ValueError``, ``RuntimeError``), so
    library callers can catch either."""


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be had: an unknown kind, missing files, a missing library."""
