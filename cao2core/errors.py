"""Errors the CLI turns into one line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""
