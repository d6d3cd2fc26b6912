"""Errors the CLI turns into one line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


def reason(exc: BaseException) -> str:
    """An exception in a few words for a one-line message: an OS error's own text (``No space left on device``),
    else its message on one line, else its type's name."""
    return getattr(exc, "strerror", None) or " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
