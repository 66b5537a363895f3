"""The base of the errors a user can fix: the command-line tools print their message and exit with 2."""


class UserError(Exception):
    """Bad input, data or environment; the message names the file, key or setting and how to fix it."""
