"""One error type for bad input: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong and how to fix it."""
