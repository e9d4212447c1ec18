"""The one base class for errors a user can cause.

Every error that bad input, a wrong option or a mismatched artifact can trigger derives from
:class:`TvrerankError`; its message names the file or option and says what to do. The command
line catches exactly this class and prints the message (no traceback); any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


def reason_of(exc: BaseException, *, last: bool = False, limit: int = 160, default: str | None = None) -> str:
    """One line of a library's exception for a message of ours: its first (or ``last``) non-blank
    line, at most ``limit`` characters; ``default`` (else the exception's type name) when it is empty."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return default or type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]


class TvrerankError(Exception):
    """A problem with the user's input, options or artifacts (not a bug in tvrerank)."""


class InputError(TvrerankError, ValueError):
    """A value, option or file content that cannot be used as given."""


class MissingInput(TvrerankError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CacheMismatch(TvrerankError, ValueError):
    """An artifact (index, candidates, run, gallery store) used with a cache it was not made from."""


class CorruptFile(TvrerankError, ValueError):
    """An artifact that exists but cannot be read (truncated, zero bytes, not what its name says)."""


class NonFiniteScores(TvrerankError, ArithmeticError):
    """A re-ranker produced NaN or inf scores (diverged training or a broken checkpoint)."""
